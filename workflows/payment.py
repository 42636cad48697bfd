"""PaymentWorkflow: one durable saga per payment, workflow id `payment-<payment id>`.

    initiate → authorize (risk rules, then the processor) → [approve] → reserve → settle

Every step appends its event to the ledger. If a step fails after its retries, or a
`cancel` Update lands before settlement, the saga closes the payment: it compensates
in reverse, then appends PaymentDeclined, PaymentFailed, PaymentCancelled or
PaymentRejected, naming the reason and the step.

The saga survives anything an operator or a crash does to it:

- **Payloads come from recorded facts.** An event's payload is a function of the
  payment and of events already in the ledger (a hold expires `hold_expiry_s` after
  the authorization, or the approval, was recorded), never of the clock of the run
  that makes it. A step re-run by a retry, a new worker or an operator's reset
  appends nothing new.
- **The ledger has the last word.** Every step returns the stream's state. When a
  re-run finds the ledger ahead of it (a reset of a payment that already settled, or
  failed), it follows the ledger: an ended payment stays as it ended, with no call to
  the processor.
- **One way to close.** Every failure, at every step, goes through `_close`, which
  compensates from the ledger's facts (`ledger.close`): a hold still held is released,
  an authorization still recorded is voided in the ledger (so the payment can no
  longer settle) and only then at the processor (which refuses otherwise), then the
  terminal event. Nothing stops it: it is shielded from cancellation, and an outage
  of any length is waited out in rounds, continuing as a new run whenever the history
  grows long.

**The capture is the pivot.** Settlement captures the authorization at the processor
(idempotent by payment id), then posts PaymentSettled, in one activity. Until the
capture, a failure is retried until the hold expires, then the payment closes; a close
of a reserved payment first has the processor fence off its capture (a capture still
in flight is then refused), and if the processor says it captured after all, the
payment settles instead. After the capture nothing voids the payment and no hold
expiry gives up: PaymentSettled is posted until the ledger takes it, and cancel is
refused ("settling"). A capture the ledger never posts is what reconciliation finds
(missing_in_ledger).

A terminated workflow is the sweeper's to repair (workflows/sweeper.py), with the same
`ledger.close` and the same capture fence: a captured payment is settled, never
released. No path leaves a hold in place, or a stream without a terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from ledger.events import REASON_CHARS_MAX, event_id_for
    from ledger.money import format_amount
    from ledger.state_machine import TERMINAL_STATES
    from workflows.models import (
        CAPTURED_NOT_POSTED,
        TERMINAL_STATUSES,
        ApproveRequest,
        AuthorizationRequest,
        AuthorizationResult,
        CancelRequest,
        CaptureFence,
        CaptureRequest,
        CaptureResult,
        Close,
        Closed,
        FenceRequest,
        FindEvent,
        InitiateResult,
        PaymentOutcome,
        PaymentRequest,
        PaymentState,
        PaymentStatus,
        Recorded,
        RecordEvent,
        RejectRequest,
        Resume,
        UpdateAccepted,
        VoidRequest,
        VoidResult,
        settlement_payload,
    )
    from workflows.search_attributes import PAYMENT_STATUS

# Ledger steps: local activities, quick, retried a bounded number of times going
# forward (`ledger_attempts_max`); then the saga closes the payment.
LEDGER_TIMEOUT = timedelta(seconds=10)
LEDGER_BACKOFF = timedelta(milliseconds=200)
LEDGER_BACKOFF_MAX = timedelta(seconds=5)
# Settlement is tried quickly first, so the common case puts no timer in the history.
SETTLE_FIRST_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=1),
    maximum_attempts=3,
)
# What must not give up (closing, and settling until the hold expires) goes in rounds:
# a bounded retry, then a durable pause, then another round; the history grows by a
# few events a round, and continues as new past `history_events_max`.
ROUND_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=5,
)
ROUND_PAUSE = timedelta(seconds=30)
LONG_RETRY_LOCAL_THRESHOLD = timedelta(seconds=1)
# The processor's void: a regular activity retried without limit on the server, which
# adds nothing to the history until it ends.
PROCESSOR_VOID_TIMEOUT = timedelta(seconds=30)
PROCESSOR_VOID_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=0,
    non_retryable_error_types=["void_refused"],
)
# Closing a reserved payment: the processor fences off its capture first (or reports
# that it captured it). Retried without limit, like the void, and for the same reason.
PROCESSOR_FENCE_TIMEOUT = timedelta(seconds=30)
PROCESSOR_FENCE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=0,
)
# Settlement captures at the processor before it posts (issue 10). A payment whose
# history predates this keeps settling without a capture when it replays.
CAPTURE_PATCH = "processor-capture"
# The capture (which also posts PaymentSettled) is a local activity by default, by
# measurement: bench/e2e_workflow.py, 300 payments 20 at a time, 4 rounds of each shape
# alternating on this shared 2-core machine, medians: local 18.9 payments/s, p50
# 1,002 ms, 29.3 CPU ms a payment; regular 16.0 payments/s, p50 1,237 ms, 31.0 CPU ms
# (saga/floor in the same runs 1.33 and 1.25). A regular activity costs a task round
# trip through the server, one more workflow task and its history events; a local one
# runs inside the workflow task that reserved. It is as safe: a local capture whose
# result was lost runs again, and the processor's idempotency by payment id and the
# settlement's deterministic event id make the repeat a no-op. The price: while it
# runs it holds the workflow task, so a query or an Update (cancel) waits for it. The
# simulator answers in milliseconds; for a processor whose captures can be slow, set
# `PaymentPolicy.capture_activity = "regular"`.
# After a capture, a refusal of the settlement that means the stream ended or began
# compensating without it: only a closer older than the capture fence can do that.
LEDGER_MOVED_ERRORS = frozenset({"stream_closed", "invalid_transition"})
# How a failed step surfaces in the workflow: a regular activity's failure arrives as an
# ActivityError wrapping the cause, a local activity's as the cause itself.
STEP_FAILED = (ActivityError, ApplicationError)
# Declines are answers, not failures; these error types are never worth a retry.
NON_RETRYABLE_PROCESSOR_ERRORS = ["processor_declined", "invalid_request"]
# Where a stream stands while a compensation is under way.
COMPENSATING_STATES = frozenset({"released", "voided", "voided_unapproved"})


def summary(request: PaymentRequest) -> str:
    """How a payment reads in the Temporal UI: "125.00 EUR acct-a → acct-b"."""
    amount = format_amount(request.amount_minor, request.currency)
    return f"{amount} {request.payer_account_id} → {request.payee_account_id}"


_LEDGER_MOVED_AFTER_CAPTURE = (
    "the ledger closed the payment after the processor captured it; reconciliation "
    "reports the capture"
)


class _Stop(Exception):
    """The saga stops going forward: compensate, then close with this outcome."""

    def __init__(
        self,
        status: PaymentStatus,
        step: str,
        reason: str,
        *,
        declined_by: str | None = None,
        rule: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.step = step
        # A reason is often an error's message, which can be of any length; the ledger
        # records at most REASON_CHARS_MAX characters (a longer one failed every workflow
        # task of the payment, which then never closed: found by the chaos run).
        self.reason = (
            reason if len(reason) <= REASON_CHARS_MAX else reason[: REASON_CHARS_MAX - 1] + "…"
        )
        self.declined_by = declined_by
        self.rule = rule


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflow:
    @workflow.init
    def __init__(self, request: PaymentRequest) -> None:
        now = workflow.now()
        self._request = request
        self._state = PaymentState(
            payment_id=request.payment_id,
            status="INITIATED",
            payer_account_id=request.payer_account_id,
            payee_account_id=request.payee_account_id,
            amount_minor=request.amount_minor,
            currency=request.currency,
            reference=request.reference,
            step="initiate",
            created_at=now,
            updated_at=now,
        )
        self._actor = f"workflow:{request.workflow_id}"
        resume = request.resume
        self._cancel: CancelRequest | None = resume.cancel if resume else None
        self._decision: ApproveRequest | RejectRequest | None = None
        self._decision_actor: str | None = resume.decision_actor if resume else None
        self._settling = resume is not None and resume.phase == "settling"
        self._closing = resume is not None and resume.phase == "closing"
        self._last_step: str | None = None
        self._rounds = resume.rounds if resume else 0
        # Set once the processor has captured the payment: it can then only settle.
        self._captured = False
        self._settle_until: datetime | None = None

    # --- messages -------------------------------------------------------------------------
    @workflow.query
    def status(self) -> PaymentState:
        """The live state of the payment."""
        return self._state

    @workflow.update
    async def wait_ended(self) -> PaymentState:
        """Answer once the payment has ended (for update-with-start callers)."""
        await workflow.wait_condition(lambda: self._state.status in TERMINAL_STATUSES)
        return self._state

    @workflow.update
    async def cancel(self, request: CancelRequest) -> UpdateAccepted:
        """Cancel before settlement: compensation runs, the payment ends CANCELLED."""
        self._cancel = request
        self._set(cancel_requested=True)
        return UpdateAccepted(payment_id=self._request.payment_id, status=self._state.status)

    @cancel.validator
    def _validate_cancel(self, request: CancelRequest) -> None:
        if self._captured:
            raise ValueError(
                "the payment is settling: the processor captured it, so it can no longer "
                "be cancelled"
            )
        if self._state.status == "SETTLED" or self._settling:
            raise ValueError("the payment is settled (or settling); it can no longer be cancelled")
        if self._state.status in TERMINAL_STATUSES:
            raise ValueError(f"the payment already ended ({self._state.status})")
        if self._cancel is not None:
            raise ValueError("a cancellation is already under way")
        if self._closing:
            raise ValueError("the payment is already being closed")

    @workflow.update
    async def approve(self, request: ApproveRequest) -> UpdateAccepted:
        """Approve a payment waiting for approval; it goes on to reserve and settle."""
        self._decision = request
        return UpdateAccepted(payment_id=self._request.payment_id, status=self._state.status)

    @approve.validator
    def _validate_approve(self, request: ApproveRequest) -> None:
        self._require_pending_approval()

    @workflow.update
    async def reject(self, request: RejectRequest) -> UpdateAccepted:
        """Reject a payment waiting for approval; it is compensated and ends REJECTED."""
        self._decision = request
        return UpdateAccepted(payment_id=self._request.payment_id, status=self._state.status)

    @reject.validator
    def _validate_reject(self, request: RejectRequest) -> None:
        self._require_pending_approval()

    def _require_pending_approval(self) -> None:
        if self._state.status != "PENDING_APPROVAL":
            raise ValueError(
                f"the payment is {self._state.status}; only a payment waiting for approval "
                "can be approved or rejected"
            )
        if self._decision is not None:
            raise ValueError("a decision on this payment was already made")
        if self._cancel is not None:
            raise ValueError("the payment is being cancelled")

    # --- the saga -------------------------------------------------------------------------
    @workflow.run
    async def run(self, request: PaymentRequest) -> PaymentOutcome:
        try:
            return await self._go()
        except _Stop as stop:
            return await self._close(stop)
        except asyncio.CancelledError:
            # The workflow itself was cancelled (from the UI or the API): undo, record,
            # and end as cancelled.
            await self._close(_Stop("CANCELLED", self._state.step, "the workflow was cancelled"))
            raise

    async def _go(self) -> PaymentOutcome:
        request, policy = self._request, self._request.policy
        resume = request.resume
        if resume is not None:
            self._set(authorization_id=resume.authorization_id)
            if resume.phase == "closing":
                assert resume.status is not None
                raise _Stop(resume.status, resume.step, resume.reason)
            self._set(status="RESERVED", step="settle", hold_expires_at=resume.hold_expires_at)
            self._settle_until = resume.settle_until
            if resume.capture_id is not None:
                # Past the pivot: only the posting is left, however long it takes.
                self._pivot(resume.capture_id)
                if not await self._post_settlement():
                    raise _Stop("FAILED", "settle", _LEDGER_MOVED_AFTER_CAPTURE)
                return self._settled()
            assert resume.hold_expires_at is not None and resume.settle_until is not None
            if workflow.patched(CAPTURE_PATCH):
                await self._capture_and_settle(resume.hold_expires_at, resume.settle_until)
            else:
                await self._settle_in_rounds(resume.hold_expires_at, resume.settle_until)
            return self._settled()

        # 1. Initiate (the risk rules are judged in the same step).
        self._details("Recording the payment in the ledger")
        try:
            initiated: InitiateResult = await self._ledger(
                "ledger.initiate", request, result_type=InitiateResult
            )
        except STEP_FAILED as error:
            raise _Stop(
                "FAILED", "initiate", f"the ledger did not record it: {_cause(error)}"
            ) from None
        self._last_step = "initiate"
        self._follow(initiated.recorded, "initiate")
        if initiated.invalid_reason is not None:
            raise _Stop("FAILED", "initiate", initiated.invalid_reason)
        self._check_cancel()

        # 2. Authorize: the risk rules' verdict, then the processor.
        self._set(step="authorize")
        risk = initiated.risk
        if risk is not None and not risk.approved:
            raise _Stop(
                "DECLINED",
                "authorize",
                risk.reason or "declined by risk rules",
                declined_by="risk",
                rule=risk.rule,
            )
        authorization = await self._authorize()
        authorized = authorization.recorded
        assert authorized is not None
        self._last_step = "authorize"
        self._follow(authorized, "authorize")
        self._set(status="AUTHORIZED", authorization_id=authorization.authorization_id)
        self._check_cancel()

        # 3. Approve, at or above the threshold. The hold counts from the last fact
        #    before it: the authorization, or the approval.
        hold_from = authorized.recorded_at
        if request.amount_minor >= policy.approval_threshold_minor:
            hold_from = await self._await_approval(authorized.recorded_at)

        # 4. Reserve.
        self._set(step="reserve")
        self._details("Reserving the funds")
        hold_expires_at = hold_from + timedelta(seconds=policy.hold_expiry_s)
        try:
            reserved = await self._record(
                "reserve",
                "FundsReserved",
                {
                    "payment_id": request.payment_id,
                    "payer_account_id": request.payer_account_id,
                    "payee_account_id": request.payee_account_id,
                    "amount_minor": request.amount_minor,
                    "currency": request.currency,
                    "expires_at": hold_expires_at.isoformat(),
                },
            )
        except STEP_FAILED as error:
            raise _Stop("FAILED", "reserve", _cause(error)) from None
        self._follow(reserved, "reserve")
        # The hold expires in the ledger's time; the saga waits for it in its own.
        settle_until = workflow.now() + (hold_expires_at - reserved.checked_at)
        self._set(status="RESERVED", hold_expires_at=hold_expires_at)
        self._check_cancel()

        # 5. Settle, unless the hold expires first: capture at the processor, then post.
        self._set(step="settle")
        self._details(f"Settling; the hold expires at {hold_expires_at.isoformat()}")
        self._settling = True
        self._settle_until = settle_until
        if workflow.patched(CAPTURE_PATCH):
            await self._capture_and_settle(hold_expires_at, settle_until)
            return self._settled()
        # A payment started before captures existed settles as it always did.
        try:
            # The common case: settlement lands at once, and no timer enters the history.
            settled = await self._record(
                "settle", "PaymentSettled", self._settlement(), retry=SETTLE_FIRST_RETRY
            )
            self._follow(settled, "settle")
        except STEP_FAILED as error:
            if _non_retryable(error):
                self._settling = False
                raise _Stop("FAILED", "settle", _cause(error)) from None
            await self._settle_in_rounds(hold_expires_at, settle_until)
        return self._settled()

    def _settled(self) -> PaymentOutcome:
        self._set(status="SETTLED", waiting_for=None)
        self._details("Settled")
        return PaymentOutcome(payment_id=self._request.payment_id, status="SETTLED", step="settle")

    def _follow(self, recorded: Recorded, step: str) -> None:
        """Go on only if the ledger is where this step left it.

        A re-run (a reset, a new worker) can find the stream further on: ended, or with
        a compensation under way. Then the ledger's outcome stands, and the close
        finishes what another run began, without going forward again.
        """
        if recorded.state in TERMINAL_STATES or recorded.state in COMPENSATING_STATES:
            self._settling = False
            raise _Stop(
                "FAILED",
                step,
                "a compensation was under way in the ledger when this run reached it",
            )

    async def _authorize(self) -> AuthorizationResult:
        request, policy = self._request, self._request.policy
        self._details("Waiting for the processor to authorize the payment")
        try:
            authorization: AuthorizationResult = await self._interruptible(
                workflow.execute_activity(
                    "processor.authorize",
                    AuthorizationRequest(
                        payment_id=request.payment_id,
                        amount_minor=request.amount_minor,
                        currency=request.currency,
                        payer_account_id=request.payer_account_id,
                        metadata=request.metadata,
                        actor=self._actor,
                        causation_id=self._causation(),
                    ),
                    result_type=AuthorizationResult,
                    start_to_close_timeout=timedelta(seconds=policy.processor_timeout_s),
                    heartbeat_timeout=timedelta(seconds=policy.processor_heartbeat_s),
                    retry_policy=RetryPolicy(
                        initial_interval=timedelta(seconds=1),
                        backoff_coefficient=2.0,
                        maximum_interval=timedelta(seconds=10),
                        maximum_attempts=policy.processor_attempts_max,
                        non_retryable_error_types=NON_RETRYABLE_PROCESSOR_ERRORS,
                    ),
                )
            )
        except STEP_FAILED as error:
            raise _Stop(
                "FAILED", "authorize", f"the processor did not answer: {_cause(error)}"
            ) from None
        if not authorization.approved:
            raise _Stop(
                "DECLINED",
                "authorize",
                authorization.decline_reason or "declined",
                declined_by="processor",
            )
        return authorization

    async def _settle_in_rounds(self, hold_expires_at: datetime, settle_until: datetime) -> None:
        """An outage outlasted the quick tries: keep settling, but not past the hold
        (`settle_until` is its expiry in workflow time)."""
        self._settling = True
        self._details(f"Settlement failing; retrying until the hold expires at {hold_expires_at}")
        while workflow.now() < settle_until:
            try:
                settled = await self._record(
                    "settle", "PaymentSettled", self._settlement(), retry=ROUND_RETRY
                )
            except STEP_FAILED as error:
                if _non_retryable(error):
                    self._settling = False
                    raise _Stop("FAILED", "settle", _cause(error)) from None
                remaining = settle_until - workflow.now()
                if remaining > timedelta(0):
                    await workflow.sleep(min(ROUND_PAUSE, remaining))
                self._continue_as_new_if_long(
                    Resume(
                        phase="settling",
                        hold_expires_at=hold_expires_at,
                        settle_until=settle_until,
                        authorization_id=self._state.authorization_id,
                    )
                )
                continue
            self._follow(settled, "settle")
            return
        self._settling = False
        raise _Stop("FAILED", "settle", "the hold expired before settlement")

    def _settlement(self) -> dict[str, Any]:
        return settlement_payload(self._request)

    # --- the pivot: capture, then post ------------------------------------------------------
    async def _capture_and_settle(self, hold_expires_at: datetime, settle_until: datetime) -> None:
        """Capture at the processor, then post PaymentSettled (one activity does both).

        Before the capture, a failure is retried until the hold expires (`settle_until`,
        in workflow time); then the payment closes, behind a capture fence. Once the
        processor has captured, the payment can only settle: the posting is retried
        until the ledger takes it, whatever the hold, and nothing voids it.
        """
        request = self._request
        capture = CaptureRequest(
            payment_id=request.payment_id,
            amount_minor=request.amount_minor,
            currency=request.currency,
            metadata=request.metadata,
            settlement=RecordEvent(
                payment_id=request.payment_id,
                step="settle",
                event_type="PaymentSettled",
                payload=self._settlement(),
                actor=self._actor,
                causation_id=self._causation(),
            ),
        )
        # The common case: captured and posted at once, and no timer enters the history.
        retry = SETTLE_FIRST_RETRY
        while True:
            try:
                captured = await self._processor_capture(capture, retry)
            except STEP_FAILED as error:
                if _error_type(error) == CAPTURED_NOT_POSTED:
                    self._pivot(_first_detail(error) or "unknown")
                    if not await self._post_settlement():
                        raise _Stop("FAILED", "settle", _LEDGER_MOVED_AFTER_CAPTURE) from None
                    return
                if _non_retryable(error):
                    # Refused: the authorization was voided or fenced off; nothing moved.
                    self._settling = False
                    raise _Stop("FAILED", "settle", _cause(error)) from None
                remaining = settle_until - workflow.now()
                if remaining <= timedelta(0):
                    # The close fences off the capture, or finds that it happened after
                    # all (a lost answer), and then settles instead.
                    self._settling = False
                    raise _Stop("FAILED", "settle", "the hold expired before settlement") from None
                self._details(
                    f"The capture is failing ({_cause(error)}); retrying until the hold "
                    f"expires at {hold_expires_at.isoformat()}"
                )
                await workflow.sleep(min(ROUND_PAUSE, remaining))
                self._continue_as_new_if_long(
                    Resume(
                        phase="settling",
                        hold_expires_at=hold_expires_at,
                        settle_until=settle_until,
                        authorization_id=self._state.authorization_id,
                    )
                )
                retry = ROUND_RETRY
                continue
            self._pivot(captured.capture_id or "unknown")
            self._last_step = "settle"
            return

    async def _processor_capture(
        self, capture: CaptureRequest, retry: RetryPolicy
    ) -> CaptureResult:
        """The capture activity, local or regular as the policy says (local by default:
        see the measurement by CAPTURE_PATCH)."""
        timeout = timedelta(seconds=self._request.policy.processor_timeout_s)
        result: CaptureResult
        if self._request.policy.capture_activity == "regular":
            result = await workflow.execute_activity(
                "processor.capture",
                capture,
                result_type=CaptureResult,
                start_to_close_timeout=timeout,
                retry_policy=retry,
            )
        else:
            result = await workflow.execute_local_activity(
                "processor.capture",
                capture,
                result_type=CaptureResult,
                start_to_close_timeout=timeout,
                retry_policy=retry,
                local_retry_threshold=LONG_RETRY_LOCAL_THRESHOLD if retry is ROUND_RETRY else None,
            )
        return result

    def _pivot(self, capture_id: str) -> None:
        """The processor captured the payment: from here on it can only settle."""
        self._captured = True
        self._settling = True
        self._set(capture_id=capture_id)

    async def _post_settlement(self) -> bool:
        """Post PaymentSettled after a capture, until the ledger takes it. False if the
        ledger closed the payment some other way meanwhile (its outcome then stands, and
        reconciliation finds the capture the ledger never posted)."""
        while True:
            try:
                await self._record(
                    "settle", "PaymentSettled", self._settlement(), retry=ROUND_RETRY
                )
                return True
            except STEP_FAILED as error:
                if _error_type(error) in LEDGER_MOVED_ERRORS:
                    self._settling = False
                    return False
                self._details(
                    f"Captured ({self._state.capture_id}); the ledger has not taken the "
                    f"settlement yet ({_cause(error)}); retrying until it does"
                )
                await workflow.sleep(ROUND_PAUSE)
                self._continue_as_new_if_long(
                    Resume(
                        phase="settling",
                        hold_expires_at=self._state.hold_expires_at,
                        settle_until=self._settle_until,
                        authorization_id=self._state.authorization_id,
                        capture_id=self._state.capture_id,
                    )
                )

    async def _await_approval(self, authorized_at: datetime) -> datetime:
        """Wait for an operator's decision; returns when the approval was recorded."""
        request, policy = self._request, self._request.policy
        deadline = authorized_at + timedelta(seconds=policy.approval_deadline_s)
        self._set(step="approve")
        try:
            requested = await self._record(
                "approval-request",
                "ApprovalRequested",
                {
                    "payment_id": request.payment_id,
                    "threshold_minor": policy.approval_threshold_minor,
                    "deadline_at": deadline.isoformat(),
                },
            )
        except STEP_FAILED as error:
            raise _Stop("FAILED", "approve", _cause(error)) from None
        self._follow(requested, "approve")
        if requested.state != "pending_approval":
            # An earlier run of this payment recorded the approval already.
            approved: Recorded | None = await self._ledger(
                "ledger.recorded",
                FindEvent(payment_id=request.payment_id, event_type="PaymentApproved"),
                result_type=Recorded | None,
            )
            if approved is None:
                raise _Stop("FAILED", "approve", f"unexpected state {requested.state!r}")
            self._set(status="AUTHORIZED")
            return approved.recorded_at
        self._set(status="PENDING_APPROVAL", approval_deadline_at=deadline)
        self._details(
            f"Waiting for an operator to approve or reject (Update), until {deadline.isoformat()}"
        )
        try:
            # The deadline is the ledger's; what is left of it, by the ledger's clock,
            # is waited for in workflow time.
            await workflow.wait_condition(
                lambda: self._decision is not None or self._cancel is not None,
                timeout=max(timedelta(0), deadline - requested.checked_at),
            )
        except TimeoutError:
            raise _Stop("REJECTED", "approve", "the approval deadline passed") from None
        self._check_cancel()
        decision = self._decision
        if isinstance(decision, RejectRequest):
            self._decision_actor = decision.actor
            raise _Stop("REJECTED", "approve", decision.reason)
        assert isinstance(decision, ApproveRequest)
        try:
            approval = await self._record(
                "approve",
                "PaymentApproved",
                {
                    "payment_id": request.payment_id,
                    "approved_by": decision.actor,
                    "note": decision.note,
                },
                actor=decision.actor,
            )
        except STEP_FAILED as error:
            raise _Stop("FAILED", "approve", _cause(error)) from None
        self._follow(approval, "approve")
        self._set(status="AUTHORIZED")
        return approval.recorded_at

    # --- closing ----------------------------------------------------------------------------
    async def _close(self, stop: _Stop) -> PaymentOutcome:
        """Compensate, then append the terminal event. Nothing stops this."""
        self._closing = True
        self._settling = False
        closing = asyncio.ensure_future(self._close_from_the_ledger(stop))
        while True:
            try:
                return await asyncio.shield(closing)
            except asyncio.CancelledError:
                # A cancellation arriving now must not leave a hold or an open stream:
                # keep waiting for the compensation, which the shield keeps running.
                if closing.done():
                    return closing.result()

    async def _close_from_the_ledger(self, stop: _Stop) -> PaymentOutcome:
        request = self._request
        if self._cancel is not None and stop.status not in ("REJECTED", "DECLINED"):
            stop = _Stop("CANCELLED", stop.step, self._cancel.reason)
        actor = self._actor
        if stop.status == "CANCELLED" and self._cancel is not None:
            actor = self._cancel.actor
        elif stop.status == "REJECTED":
            if isinstance(self._decision, RejectRequest):
                self._decision_actor = self._decision.actor
            actor = self._decision_actor or self._actor
        self._details(f"Closing: {stop.reason}")
        close = Close(
            payment_id=request.payment_id,
            status=stop.status,
            step=stop.step,
            reason=stop.reason,
            actor=actor,
            causation_id=self._causation(),
            declined_by=stop.declined_by,
            rule=stop.rule,
            initiate=request.model_copy(update={"resume": None}),
        )
        while True:
            try:
                closed: Closed = await self._ledger(
                    "ledger.close",
                    close,
                    result_type=Closed,
                    retry=ROUND_RETRY,
                    local_retry_threshold=LONG_RETRY_LOCAL_THRESHOLD,
                )
            except STEP_FAILED as error:
                self._details(f"Closing: the ledger is failing ({_cause(error)}); retrying")
                await workflow.sleep(ROUND_PAUSE)
                self._continue_as_new_if_long(
                    Resume(
                        phase="closing",
                        status=close.status,
                        step=close.step,
                        reason=close.reason,
                        authorization_id=self._state.authorization_id,
                        cancel=self._cancel,
                        decision_actor=self._decision_actor,
                    )
                )
                continue
            if closed.closed:
                break
            if closed.needs_capture_fence:
                self._details("Closing: fencing off the capture at the processor")
                fence: CaptureFence = await workflow.execute_activity(
                    "processor.fence_capture",
                    FenceRequest(payment_id=request.payment_id, reason=close.reason),
                    result_type=CaptureFence,
                    start_to_close_timeout=PROCESSOR_FENCE_TIMEOUT,
                    retry_policy=PROCESSOR_FENCE_RETRY,
                )
                if fence.captured:
                    # The processor captured it after all (an answer that was lost, or a
                    # capture that outlived its call): the money moved, so it settles.
                    self._pivot(fence.capture_id or "unknown")
                    if await self._post_settlement():
                        return self._settled()
                    continue  # the ledger closed it meanwhile: read it again
                close = close.model_copy(update={"capture_fenced": True})
                continue
            self._details("Closing: voiding the authorization at the processor")
            try:
                await workflow.execute_activity(
                    "processor.void",
                    VoidRequest(payment_id=request.payment_id, reason=close.reason),
                    result_type=VoidResult,
                    start_to_close_timeout=PROCESSOR_VOID_TIMEOUT,
                    retry_policy=PROCESSOR_VOID_RETRY,
                )
            except STEP_FAILED as error:
                if _error_type(error) != "void_refused":
                    raise
                continue  # the ledger moved meanwhile: read it again
            close = close.model_copy(update={"processor_voided": True})
        status: PaymentStatus = closed.status
        reason = closed.reason if status != "SETTLED" else None
        self._set(status=status, failure_reason=reason, waiting_for=None)
        self._details(f"{status.capitalize()} at {stop.step}: {reason or 'settled'}")
        return PaymentOutcome(
            payment_id=request.payment_id,
            status=status,
            failure_reason=reason,
            step=stop.step if status != "SETTLED" else "settle",
        )

    def _continue_as_new_if_long(self, resume: Resume) -> None:
        """Keep the history bounded, however long an outage lasts."""
        self._rounds += 1
        if workflow.info().get_current_history_length() < self._request.policy.history_events_max:
            return
        self._continue_as_new(resume.model_copy(update={"rounds": self._rounds}))

    def _continue_as_new(self, resume: Resume) -> NoReturn:
        workflow.continue_as_new(self._request.model_copy(update={"resume": resume}))

    # --- plumbing ---------------------------------------------------------------------------
    async def _record(
        self,
        step: str,
        event_type: str,
        payload: dict[str, Any],
        *,
        actor: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> Recorded:
        recorded: Recorded = await self._ledger(
            "ledger.record_event",
            RecordEvent(
                payment_id=self._request.payment_id,
                step=step,
                event_type=event_type,
                payload=payload,
                actor=actor or self._actor,
                causation_id=self._causation(),
            ),
            result_type=Recorded,
            retry=retry,
            local_retry_threshold=LONG_RETRY_LOCAL_THRESHOLD if retry is ROUND_RETRY else None,
        )
        self._last_step = step
        return recorded

    async def _ledger(
        self,
        activity: str,
        arg: Any,
        *,
        result_type: Any,
        retry: RetryPolicy | None = None,
        local_retry_threshold: timedelta | None = None,
    ) -> Any:
        """A ledger step: a local activity, unless the policy asks for regular ones."""
        retry_policy = retry or RetryPolicy(
            initial_interval=LEDGER_BACKOFF,
            backoff_coefficient=2.0,
            maximum_interval=LEDGER_BACKOFF_MAX,
            maximum_attempts=self._request.policy.ledger_attempts_max,
        )
        if self._request.policy.ledger_activities == "regular":
            return await workflow.execute_activity(
                activity,
                arg,
                result_type=result_type,
                start_to_close_timeout=LEDGER_TIMEOUT,
                retry_policy=retry_policy,
            )
        return await workflow.execute_local_activity(
            activity,
            arg,
            result_type=result_type,
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=retry_policy,
            local_retry_threshold=local_retry_threshold,
        )

    def _causation(self) -> str | None:
        """Each event is caused by the previous step's (ids are deterministic)."""
        if self._last_step is None:
            return self._request.causation_id
        return str(event_id_for(self._request.workflow_id, self._last_step))

    async def _interruptible(self, step: Awaitable[Any]) -> Any:
        """Run a step, but give up on it as soon as a cancel Update is accepted."""
        task = asyncio.ensure_future(step)
        cancel_requested = asyncio.ensure_future(
            workflow.wait_condition(lambda: self._cancel is not None)
        )
        await workflow.wait([task, cancel_requested], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await _quietly(task)
            self._check_cancel()
        cancel_requested.cancel()
        return task.result()

    def _check_cancel(self) -> None:
        if self._cancel is not None:
            raise _Stop("CANCELLED", self._state.step, self._cancel.reason)

    def _set(self, **changes: Any) -> None:
        status_before = self._state.status
        self._state = self._state.model_copy(update={**changes, "updated_at": workflow.now()})
        if self._state.status != status_before:
            workflow.upsert_search_attributes([PAYMENT_STATUS.value_set(self._state.status)])

    def _details(self, details: str) -> None:
        workflow.set_current_details(details)
        self._set(waiting_for=details)


async def _quietly(task: asyncio.Future[Any]) -> None:
    """Wait for a task we cancelled, whatever it ended with."""
    with contextlib.suppress(asyncio.CancelledError, ActivityError, ApplicationError):
        await task


def _error_type(error: BaseException) -> str | None:
    cause = error.__cause__ if isinstance(error, ActivityError) else error
    return cause.type if isinstance(cause, ApplicationError) else None


def _first_detail(error: BaseException) -> str | None:
    """The first detail of the application error behind a step's failure, if a string."""
    cause = error.__cause__ if isinstance(error, ActivityError) else error
    if isinstance(cause, ApplicationError) and cause.details:
        detail = cause.details[0]
        return detail if isinstance(detail, str) else None
    return None


def _non_retryable(error: BaseException) -> bool:
    cause = error.__cause__ if isinstance(error, ActivityError) else error
    return isinstance(cause, ApplicationError) and cause.non_retryable


def _cause(error: BaseException) -> str:
    """The innermost message: "insufficient funds", not "activity task failed"."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error) or type(error).__name__


if __name__ == "__main__":
    raise SystemExit("workflow definitions are loaded by the worker, not run directly")
