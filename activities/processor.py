"""The payment processor: a pluggable `Authorizer`, and the simulator that is the default.

The processor is the one external system in a payment. It authorizes, captures and
voids, each idempotent by payment id as real processors are by idempotency key:
authorizing the same payment twice returns the first authorization, capturing twice
captures once, and voiding twice voids once. Its calls are activities: the
authorization a **regular** one (it can be slow, so it heartbeats, and a worker that
dies mid-call is noticed by the heartbeat timeout and the call retried elsewhere); the
capture local or regular by the payment's policy (see workflows/payment.py for why).

**The capture is the saga's pivot.** Once the processor has captured a payment, the
money has moved, and the payment can only settle: the saga posts PaymentSettled until
the ledger takes it, and nothing voids it. Four rules keep the processor in step with
the ledger, whoever calls and however often:

- **A void asks the ledger first.** It is refused unless the ledger has recorded that
  the payment can no longer settle (the hold released and the authorization voided in
  the ledger, or nothing reserved yet).
- **A void fences.** Voiding a payment that has no authorization yet records that
  fact, and any later authorization for it is declined: a stale call that reaches
  the processor after the saga gave up cannot leave an authorization behind.
- **A hold is released only behind a capture fence.** Before any closer (the saga, or
  the sweeper) releases a reserved payment's hold, it asks the processor to fence off
  captures (`fence_capture`). The processor answers in one locked step: either it had
  captured the payment (the closer settles it instead), or no capture can land any
  more (a stale capture still in flight is refused). Capture, fence and void lock the
  same row, so whichever comes first wins and the others see it.
- **Captured and voided exclude each other.** A capture of a voided (or fenced)
  authorization is refused; a void of a captured one is refused too, and says so.

The simulator keeps its state in PostgreSQL (`processor_authorizations`,
`processor_captures`, and every call in `processor_calls`; the functions are in
migrations/sql/0011_processor_capture.sql), so that tests can prove, for instance,
that each settled payment was captured exactly once and never voided. A payment's
`metadata.simulate` steers it:

| value     | authorization                                            | capture           |
|-----------|----------------------------------------------------------|-------------------|
| `decline` | the processor declines                                   | (never reached)   |
| `timeout` | never answers within the activity timeout                | (never reached)   |
| `flaky`   | fails twice, then succeeds                               | the same          |
| `slow`    | answers after `metadata.simulate_delay_s` (10 s default) | answers at once   |

**Outages.** Besides a payment's own behaviour, the simulator can be down for a while
for everyone: a window in `processor_faults` (set by the schema owner with `paysaga
processor fault --mode error|hang --for-s N`, never by the services, which may only
read it) makes every call (authorize, capture, fence, void, the capture lookup) fail
with a retryable error (`error`), or not answer until the window ends and then carry
on (`hang`: past the activity's heartbeat or start-to-close timeout, so Temporal
retries it elsewhere while the late call may still land, as a real one would). Calls
during a window are logged in `processor_calls` as `fault_error` or `fault_hang`.

A declined or unanswered payment never reaches its capture. `flaky` means an
unreliable processor, so its captures fail twice too (attempts 1 and 2 of the call),
which exercises the capture's retries and idempotency. `slow` stands for an issuer
that is slow to decide: a capture of an authorization already given does not wait on
the issuer, so it answers at once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.ledger import VOIDABLE_STATES, LedgerActivities
from ledger.events import payment_stream
from workflows.models import (
    CAPTURE_REFUSED,
    CAPTURED_NOT_POSTED,
    AuthorizationRequest,
    AuthorizationResult,
    CaptureFence,
    CaptureRequest,
    CaptureResult,
    FenceRequest,
    RecordEvent,
    VoidRequest,
    VoidResult,
)

log = logging.getLogger("paysaga.processor")

SLOW_DELAY_S_DEFAULT = 10.0
SLOW_DELAY_S_MAX = 3_600.0
HEARTBEAT_EVERY_S = 0.5
FLAKY_FAILURES = 2
# A hang never outlasts this, whatever the window says.
FAULT_HANG_S_MAX = SLOW_DELAY_S_MAX


class ProcessorUnavailable(Exception):
    """Transient: the processor could not be reached. Retried."""


class Authorizer(Protocol):
    """What paysaga needs from a payment processor."""

    name: str

    async def authorize(self, request: AuthorizationRequest, attempt: int) -> AuthorizationResult:
        """Authorize the payment (idempotent by payment id), or decline it."""
        ...

    async def capture(self, request: CaptureRequest, attempt: int) -> CaptureResult:
        """Capture the payment's authorization (idempotent by payment id: a repeat
        returns the first capture), or refuse if it was voided or fenced off."""
        ...

    async def fence_capture(self, request: FenceRequest, attempt: int) -> CaptureFence:
        """Make any later capture of the payment impossible, or report the capture that
        already happened (idempotent)."""
        ...

    async def void(self, request: VoidRequest, attempt: int) -> VoidResult:
        """Void the payment's authorization, or, if there is none, refuse any later one
        (idempotent). A captured authorization is not voided (`captured` says so)."""
        ...

    async def capture_of(self, payment_id: str) -> str | None:
        """The id of the payment's capture, if the processor captured it. A lookup: it
        changes nothing (unlike the fence, it leaves a capture in flight free to land)."""
        ...


def _heartbeat(details: str) -> None:
    if activity.in_activity():
        activity.heartbeat(details)


class SimulatedProcessor:
    """The built-in processor simulator, steered by `metadata.simulate`."""

    name = "simulator"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _outage(self, payment_id: str, operation: str | None, attempt: int) -> None:
        """Honour an outage window in `processor_faults`, if one is open now: raise a
        retryable error, or hang until the window ends (then the call goes on)."""
        async with self.engine.connect() as conn:
            fault = (await conn.execute(_OPEN_FAULT)).one_or_none()
        if fault is None:
            return
        if operation is not None:
            await self._log(payment_id, operation, f"fault_{fault.mode}", attempt)
        if fault.mode == "error":
            raise ProcessorUnavailable(
                f"processor unavailable (outage window until {fault.ends_at.isoformat()})"
            )
        # Hang: no answer and no heartbeat until the window closes.
        await asyncio.sleep(min(max(float(fault.remaining_s), 0.0), FAULT_HANG_S_MAX))

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
        await self._outage(request.payment_id, "authorize", attempt)
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

    async def capture(self, request: CaptureRequest, attempt: int) -> CaptureResult:
        await self._outage(request.payment_id, "capture", attempt)
        if request.metadata.get("simulate") == "flaky" and attempt <= FLAKY_FAILURES:
            await self._log(request.payment_id, "capture", "failed", attempt)
            raise ProcessorUnavailable(f"processor unavailable (simulated, attempt {attempt})")
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    _CAPTURE,
                    {
                        "p": request.payment_id,
                        "c": f"sim-cap-{uuid.uuid4().hex[:16]}",
                        "amount": request.amount_minor,
                        "currency": request.currency,
                        "attempt": attempt,
                    },
                )
            ).one()
        if row.outcome in ("captured", "replayed"):
            return CaptureResult(captured=True, capture_id=row.capture_id)
        return CaptureResult(captured=False, refusal=_CAPTURE_REFUSALS[row.outcome])

    async def fence_capture(self, request: FenceRequest, attempt: int) -> CaptureFence:
        await self._outage(request.payment_id, "fence_capture", attempt)
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(_FENCE_CAPTURE, {"p": request.payment_id, "attempt": attempt})
            ).one()
        return CaptureFence(captured=row.outcome == "captured", capture_id=row.capture_id)

    async def void(self, request: VoidRequest, attempt: int) -> VoidResult:
        await self._outage(request.payment_id, "void", attempt)
        async with self.engine.begin() as conn:
            row = (await conn.execute(_VOID, {"p": request.payment_id, "attempt": attempt})).one()
        return VoidResult(
            voided=row.outcome == "voided",
            authorization_id=row.authorization_id,
            captured=row.outcome == "refused_captured",
        )

    async def capture_of(self, payment_id: str) -> str | None:
        # A lookup logs no call (processor_calls records operations).
        await self._outage(payment_id, None, 1)
        async with self.engine.connect() as conn:
            found = await conn.execute(_CAPTURE_OF, {"p": payment_id})
            return found.scalar_one_or_none()


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
# Capture, fence and void each lock the authorization's row before deciding, in one
# function call (migrations/sql/0011_processor_capture.sql): whichever of them comes
# first wins, and the others see what it did.
_CAPTURE = text(
    "SELECT outcome, capture_id FROM "
    "processor_capture(:p, :c, CAST(:amount AS bigint), :currency, :attempt)"
)
_FENCE_CAPTURE = text("SELECT outcome, capture_id FROM processor_fence_capture(:p, :attempt)")
_VOID = text("SELECT outcome, authorization_id FROM processor_void(:p, :attempt)")
_CAPTURE_OF = text("SELECT capture_id FROM processor_captures WHERE payment_id = :p")
# The outage window open now, if any (the latest-ending one when several overlap).
_OPEN_FAULT = text(
    "SELECT mode, ends_at, extract(epoch FROM ends_at - clock_timestamp()) AS remaining_s "
    "FROM processor_faults WHERE starts_at <= clock_timestamp() AND ends_at > clock_timestamp() "
    "ORDER BY ends_at DESC LIMIT 1"
)
_CAPTURE_REFUSALS = {
    "refused_unauthorized": "the processor holds no authorization for it",
    "refused_voided": "its authorization was voided",
    "refused_fenced": "captures of it were fenced off: the payment is being closed",
    "refused_mismatch": "the amount or currency differs from its authorization",
}


FaultMode = Literal["error", "hang"]
FAULT_MODES: tuple[FaultMode, ...] = ("error", "hang")
FAULT_WINDOW_S_MAX = 3_600.0


@dataclass(frozen=True)
class FaultWindow:
    """A processor outage: every call errors (or hangs) from `starts_at` to `ends_at`."""

    fault_id: int
    mode: FaultMode
    starts_at: datetime
    ends_at: datetime

    def to_json(self) -> dict[str, object]:
        return {
            "fault_id": self.fault_id,
            "mode": self.mode,
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat(),
        }


async def open_fault_window(
    owner_engine: AsyncEngine, mode: FaultMode, duration_s: float, reason: str = ""
) -> FaultWindow:
    """Take the simulator down from now for `duration_s`. Needs the schema owner's engine:
    the services may only read the windows."""
    if mode not in FAULT_MODES:
        raise ValueError(f"mode must be one of {', '.join(FAULT_MODES)}, not {mode!r}")
    if not 0 < duration_s <= FAULT_WINDOW_S_MAX:
        raise ValueError(f"a window lasts more than 0 and at most {FAULT_WINDOW_S_MAX:.0f} s")
    async with owner_engine.begin() as conn:
        row = (
            await conn.execute(
                text(
                    "INSERT INTO processor_faults (mode, ends_at, reason) "
                    "VALUES (:mode, clock_timestamp() + make_interval(secs => :s), :reason) "
                    "RETURNING fault_id, mode, starts_at, ends_at"
                ),
                {"mode": mode, "s": duration_s, "reason": reason[:200]},
            )
        ).one()
    return FaultWindow(row.fault_id, row.mode, row.starts_at, row.ends_at)


async def close_fault_windows(owner_engine: AsyncEngine) -> list[FaultWindow]:
    """End every open outage window now; returns those it ended."""
    async with owner_engine.begin() as conn:
        rows = (
            await conn.execute(
                text(
                    "UPDATE processor_faults SET ends_at = greatest(clock_timestamp(), "
                    "starts_at + interval '1 microsecond') WHERE ends_at > clock_timestamp() "
                    "RETURNING fault_id, mode, starts_at, ends_at"
                )
            )
        ).all()
    return [FaultWindow(r.fault_id, r.mode, r.starts_at, r.ends_at) for r in rows]


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


def _attempt() -> int:
    try:
        return activity.info().attempt
    except RuntimeError:  # called outside an activity (a test calling the class directly)
        return 1


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

    @activity.defn(name="processor.capture")
    async def capture(self, request: CaptureRequest) -> CaptureResult:
        """Capture at the processor, then post the payment's PaymentSettled at once.

        Posting here, as the authorization does, saves the saga a step per payment. The
        error tells the saga which side of the pivot it is on: `capture_refused` (nothing
        was captured, and nothing can be) or `captured_not_posted` (the money moved at
        the processor; the settlement must be posted, never undone). Anything else is
        transient and retried: the capture is idempotent by payment id, and the
        settlement's event id derives from the workflow id and the step.
        """
        result = await self.authorizer.capture(request, _attempt())
        if not result.captured:
            raise ApplicationError(
                f"the processor refused to capture payment {request.payment_id}: {result.refusal}",
                type=CAPTURE_REFUSED,
                non_retryable=True,
            )
        if request.settlement is None:
            return result
        try:
            recorded = await self.ledger.record(request.settlement)
        except Exception as error:
            raise ApplicationError(
                f"captured ({result.capture_id}), but the ledger has not taken the "
                f"settlement yet: {error}",
                result.capture_id,
                type=CAPTURED_NOT_POSTED,
                non_retryable=True,
            ) from error
        return result.model_copy(update={"recorded": recorded})

    @activity.defn(name="processor.fence_capture")
    async def fence_capture(self, request: FenceRequest) -> CaptureFence:
        """Before a reserved payment's hold is released: fence off any capture, or learn
        that the processor captured it (then it must settle, never be released)."""
        fence = await self.authorizer.fence_capture(request, _attempt())
        if fence.captured:
            log.warning(
                "a payment being closed was captured at the processor: it settles instead",
                extra={"payment_id": request.payment_id, "capture_id": fence.capture_id},
            )
        return fence

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
        result = await self.authorizer.void(request, _attempt())
        if result.captured:
            # Only a closer that skipped the capture fence gets here (code older than the
            # fence): the processor holds a capture the ledger will never settle, which is
            # reconciliation's to find (missing_in_ledger).
            log.error(
                "the processor refused a void: it had captured the payment",
                extra={"payment_id": request.payment_id},
            )
        return result

    def all(self) -> list[object]:
        return [self.authorize, self.capture, self.fence_capture, self.void]
