"""PaymentWorkflow: one durable saga per payment, workflow id `payment-<payment id>`.

    initiate → authorize (risk rules, then the processor) → [approve] → reserve → settle

Every step appends its event to the ledger. If a step fails after an earlier one
succeeded, or a `cancel` Update lands before settlement, the saga compensates in
reverse, release the hold, then void the authorization, and closes the stream with
PaymentFailed, PaymentCancelled or PaymentRejected, naming the reason and the step.

Compensation rules, each enforced here:

- a compensation is registered *before* its step runs, so a step that half-happened
  (its result lost to a crash or a timeout) is still undone;
- a compensation is idempotent: it asks the ledger (release-if-reserved,
  void-if-authorized), not the workflow's memory, what to undo;
- it is retried until it succeeds (no attempt limit);
- it runs even when the workflow itself is cancelled (shielded from cancellation).

No path leaves a hold in place, or a stream without a terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from ledger.events import event_id_for
    from ledger.money import format_amount
    from workflows.models import (
        TERMINAL_STATUSES,
        ApproveRequest,
        AuthorizationRequest,
        AuthorizationResult,
        CancelRequest,
        Compensate,
        InitiateResult,
        LedgerStatus,
        PaymentOutcome,
        PaymentRequest,
        PaymentState,
        PaymentStatus,
        Recorded,
        RecordEvent,
        RejectRequest,
        UpdateAccepted,
        VoidRequest,
        VoidResult,
    )
    from workflows.search_attributes import PAYMENT_STATUS

# Ledger steps: local activities, quick, retried a bounded number of times going
# forward (then the saga compensates), and without limit when compensating.
LEDGER_TIMEOUT = timedelta(seconds=10)
LEDGER_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=8,
)
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=0,  # until it succeeds
)
SETTLE_FIRST_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=1),
    maximum_attempts=3,
)
SETTLE_RETRY = COMPENSATION_RETRY
# Retries that may go on for long (an outage) wait on durable workflow timers past this
# backoff, instead of holding the workflow task open in the worker.
LONG_RETRY_LOCAL_THRESHOLD = timedelta(seconds=1)
PROCESSOR_VOID_TIMEOUT = timedelta(seconds=30)
# How a failed step surfaces in the workflow: a regular activity's failure arrives as an
# ActivityError wrapping the cause, a local activity's as the cause itself.
STEP_FAILED = (ActivityError, ApplicationError)
# Declines are answers, not failures; these error types are never worth a retry.
NON_RETRYABLE_PROCESSOR_ERRORS = ["processor_declined", "invalid_request"]


def summary(request: PaymentRequest) -> str:
    """How a payment reads in the Temporal UI: "125.00 EUR acct-a → acct-b"."""
    amount = format_amount(request.amount_minor, request.currency)
    return f"{amount} {request.payer_account_id} → {request.payee_account_id}"


class _Stop(Exception):
    """The saga stops going forward: compensate, then close with this outcome."""

    def __init__(self, status: PaymentStatus, step: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.step = step
        self.reason = reason


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
        self._cancel: CancelRequest | None = None
        self._decision: ApproveRequest | RejectRequest | None = None
        self._settling = False
        self._last_step: str | None = None

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
        if self._state.status == "SETTLED" or self._settling:
            raise ValueError("the payment is settled (or settling); it can no longer be cancelled")
        if self._state.status in TERMINAL_STATUSES:
            raise ValueError(f"the payment already ended ({self._state.status})")
        if self._cancel is not None:
            raise ValueError("a cancellation is already under way")

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
        compensations: list[Callable[[str], Awaitable[None]]] = []
        try:
            return await self._go(compensations)
        except _Stop as stop:
            return await self._close(compensations, stop)
        except asyncio.CancelledError:
            # The workflow itself was cancelled (from the UI or the API): undo, record,
            # and end as cancelled.
            await self._close(
                compensations,
                _Stop("CANCELLED", self._state.step, "the workflow was cancelled"),
            )
            raise

    async def _go(self, compensations: list[Callable[[str], Awaitable[None]]]) -> PaymentOutcome:
        request = self._request
        policy = request.policy

        # 1. Initiate.
        self._details("Recording the payment in the ledger")
        initiated: InitiateResult = await self._ledger(
            "ledger.initiate",
            request,
            result_type=InitiateResult,
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
        )
        self._last_step = "initiate"
        if initiated.invalid_reason is not None:
            raise _Stop("FAILED", "initiate", initiated.invalid_reason)
        self._check_cancel()

        # 2. Authorize: the risk rules (evaluated by the initiate step), then the processor.
        self._set(step="authorize")
        risk = initiated.risk
        if risk is not None and not risk.approved:
            return await self._decline("risk", risk.reason or "declined by risk rules", risk.rule)
        self._check_cancel()
        # Registered before the processor is called: an authorization whose answer we
        # never saw (a timeout, a cancel mid-call) must still be voided.
        compensations.append(self._void_authorization)
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
            compensations.pop()  # a decline leaves nothing to void
            reason = authorization.decline_reason or "declined"
            return await self._decline("processor", reason, None)
        # The authorize activity recorded PaymentAuthorized in the ledger.
        self._last_step = "authorize"
        self._set(status="AUTHORIZED", authorization_id=authorization.authorization_id)
        self._check_cancel()

        # 3. Approve, at or above the threshold.
        if request.amount_minor >= policy.approval_threshold_minor:
            await self._await_approval()

        # 4. Reserve.
        self._set(step="reserve")
        self._details("Reserving the funds")
        compensations.append(self._release_hold)
        hold_expires_at = workflow.now() + timedelta(seconds=policy.hold_expiry_s)
        try:
            await self._record(
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
        self._set(status="RESERVED", hold_expires_at=hold_expires_at)
        self._check_cancel()

        # 5. Settle, unless the hold expires first.
        self._set(step="settle")
        self._details(f"Settling; the hold expires at {hold_expires_at.isoformat()}")
        self._settling = True
        try:
            # The common case: settlement lands at once, and no timer enters the history.
            await self._record(
                "settle", "PaymentSettled", self._settlement(), retry=SETTLE_FIRST_RETRY
            )
        except STEP_FAILED as error:
            if _non_retryable(error):
                self._settling = False
                raise _Stop("FAILED", "settle", _cause(error)) from None
            await self._settle_until_hold_expires(hold_expires_at)
        self._set(status="SETTLED", waiting_for=None)
        self._details("Settled")
        return PaymentOutcome(payment_id=request.payment_id, status="SETTLED", step="settle")

    async def _settle_until_hold_expires(self, hold_expires_at: datetime) -> None:
        """An outage outlasted the quick retries: keep settling, but not past the hold."""
        self._details(f"Settlement failing; retrying until the hold expires at {hold_expires_at}")
        settle = asyncio.ensure_future(
            self._record("settle", "PaymentSettled", self._settlement(), retry=SETTLE_RETRY)
        )
        done, _ = await workflow.wait(
            [settle],
            timeout=max(0.0, (hold_expires_at - workflow.now()).total_seconds()),
        )
        if not done:
            settle.cancel()
            await _quietly(settle)
            self._settling = False
            raise _Stop("FAILED", "settle", "the hold expired before settlement")
        try:
            settle.result()
        except STEP_FAILED as error:
            self._settling = False
            raise _Stop("FAILED", "settle", _cause(error)) from None

    def _settlement(self) -> dict[str, Any]:
        request, policy = self._request, self._request.policy
        fee = min(
            request.amount_minor - 1,
            request.amount_minor * policy.fee_bps // 10_000 + policy.fee_fixed_minor,
        )
        fee = fee if policy.fees_account_id else 0
        postings = [
            {
                "account_id": request.payer_account_id,
                "side": "debit",
                "amount_minor": request.amount_minor,
            },
            {
                "account_id": request.payee_account_id,
                "side": "credit",
                "amount_minor": request.amount_minor - fee,
            },
        ]
        if fee > 0:
            postings.append(
                {"account_id": policy.fees_account_id, "side": "credit", "amount_minor": fee}
            )
        return {
            "payment_id": request.payment_id,
            "currency": request.currency,
            "postings": postings,
            "fee_minor": fee,
        }

    async def _await_approval(self) -> None:
        request, policy = self._request, self._request.policy
        deadline = workflow.now() + timedelta(seconds=policy.approval_deadline_s)
        self._set(step="approve")
        await self._record(
            "approval-request",
            "ApprovalRequested",
            {
                "payment_id": request.payment_id,
                "threshold_minor": policy.approval_threshold_minor,
                "deadline_at": deadline.isoformat(),
            },
        )
        self._set(status="PENDING_APPROVAL", approval_deadline_at=deadline)
        self._details(
            f"Waiting for an operator to approve or reject (Update), until {deadline.isoformat()}"
        )
        try:
            await workflow.wait_condition(
                lambda: self._decision is not None or self._cancel is not None,
                timeout=timedelta(seconds=policy.approval_deadline_s),
            )
        except TimeoutError:
            raise _Stop("REJECTED", "approve", "the approval deadline passed") from None
        self._check_cancel()
        decision = self._decision
        if isinstance(decision, RejectRequest):
            raise _Stop("REJECTED", "approve", decision.reason)
        assert isinstance(decision, ApproveRequest)
        await self._record(
            "approve",
            "PaymentApproved",
            {
                "payment_id": request.payment_id,
                "approved_by": decision.actor,
                "note": decision.note,
            },
            actor=decision.actor,
        )
        self._set(status="AUTHORIZED")

    # --- closing ----------------------------------------------------------------------------
    async def _decline(self, by: str, reason: str, rule: str | None) -> PaymentOutcome:
        await self._record(
            "decline",
            "PaymentDeclined",
            {
                "payment_id": self._request.payment_id,
                "declined_by": by,
                "reason": reason,
                "rule": rule,
            },
        )
        self._set(status="DECLINED", failure_reason=reason, waiting_for=None)
        self._details(f"Declined by {by}: {reason}")
        return PaymentOutcome(
            payment_id=self._request.payment_id,
            status="DECLINED",
            failure_reason=reason,
            step="authorize",
        )

    async def _close(
        self, compensations: list[Callable[[str], Awaitable[None]]], stop: _Stop
    ) -> PaymentOutcome:
        """Compensate in reverse, then append the terminal event. Nothing stops this."""
        closing = asyncio.ensure_future(self._compensate_and_close(compensations, stop))
        while True:
            try:
                return await asyncio.shield(closing)
            except asyncio.CancelledError:
                # A cancellation arriving now must not leave a hold or an open stream:
                # keep waiting for the compensation, which the shield keeps running.
                if closing.done():
                    return closing.result()

    async def _compensate_and_close(
        self, compensations: list[Callable[[str], Awaitable[None]]], stop: _Stop
    ) -> PaymentOutcome:
        if self._cancel is not None and stop.status != "REJECTED":
            stop = _Stop("CANCELLED", stop.step, self._cancel.reason)
        self._details(f"Compensating: {stop.reason}")
        for compensation in reversed(compensations):
            await compensation(stop.reason)
        request = self._request
        if stop.status == "CANCELLED":
            cancelled_by = self._cancel.actor if self._cancel else self._actor
            event_type, step = "PaymentCancelled", "cancel"
            payload: dict[str, Any] = {
                "payment_id": request.payment_id,
                "step": stop.step,
                "reason": stop.reason,
                "cancelled_by": cancelled_by,
            }
            actor = cancelled_by
        elif stop.status == "REJECTED":
            rejected_by = self._decision.actor if self._decision else self._actor
            event_type, step = "PaymentRejected", "reject"
            payload = {
                "payment_id": request.payment_id,
                "rejected_by": rejected_by,
                "reason": stop.reason,
            }
            actor = rejected_by
        else:
            event_type, step = "PaymentFailed", "fail"
            payload = {"payment_id": request.payment_id, "step": stop.step, "reason": stop.reason}
            actor = self._actor
        try:
            await self._record(step, event_type, payload, actor=actor, retry=COMPENSATION_RETRY)
        except STEP_FAILED as error:
            if _error_type(error) != "stream_closed":
                raise
            # The step raced to completion after all (a settlement that committed as its
            # hold expired): the ledger has the last word.
            ledger_status: LedgerStatus = await self._ledger(
                "ledger.payment_status",
                request.payment_id,
                result_type=LedgerStatus,
                start_to_close_timeout=LEDGER_TIMEOUT,
                retry_policy=COMPENSATION_RETRY,
                local_retry_threshold=LONG_RETRY_LOCAL_THRESHOLD,
            )
            stop = _Stop(ledger_status.status, stop.step, stop.reason)
        self._set(
            status=stop.status,
            failure_reason=None if stop.status == "SETTLED" else stop.reason,
            waiting_for=None,
        )
        self._details(f"{stop.status.capitalize()} at {stop.step}: {stop.reason}")
        return PaymentOutcome(
            payment_id=request.payment_id,
            status=stop.status,
            failure_reason=stop.reason,
            step=stop.step,
        )

    async def _release_hold(self, reason: str) -> None:
        self._details("Compensating: releasing the hold")
        await self._ledger(
            "ledger.release_if_reserved",
            self._compensate(reason),
            result_type=Recorded | None,
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=COMPENSATION_RETRY,
            local_retry_threshold=LONG_RETRY_LOCAL_THRESHOLD,
        )

    async def _void_authorization(self, reason: str) -> None:
        self._details("Compensating: voiding the authorization at the processor")
        await workflow.execute_activity(
            "processor.void",
            VoidRequest(payment_id=self._request.payment_id, reason=reason),
            result_type=VoidResult,
            start_to_close_timeout=PROCESSOR_VOID_TIMEOUT,
            retry_policy=COMPENSATION_RETRY,
        )
        await self._ledger(
            "ledger.record_void_if_authorized",
            self._compensate(reason),
            result_type=Recorded | None,
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=COMPENSATION_RETRY,
            local_retry_threshold=LONG_RETRY_LOCAL_THRESHOLD,
        )

    def _compensate(self, reason: str) -> Compensate:
        return Compensate(
            payment_id=self._request.payment_id,
            reason=reason,
            actor=self._cancel.actor if self._cancel else self._actor,
            causation_id=self._causation(),
        )

    # --- plumbing ---------------------------------------------------------------------------
    async def _record(
        self,
        step: str,
        event_type: str,
        payload: dict[str, Any],
        *,
        actor: str | None = None,
        retry: RetryPolicy = LEDGER_RETRY,
    ) -> Recorded:
        long_retry = retry.maximum_attempts == 0
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
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=retry,
            local_retry_threshold=LONG_RETRY_LOCAL_THRESHOLD if long_retry else None,
        )
        self._last_step = step
        return recorded

    async def _ledger(
        self,
        activity: str,
        arg: Any,
        *,
        result_type: Any,
        start_to_close_timeout: timedelta,
        retry_policy: RetryPolicy,
        local_retry_threshold: timedelta | None = None,
    ) -> Any:
        """A ledger step: a local activity, unless the policy asks for regular ones."""
        if self._request.policy.ledger_activities == "regular":
            return await workflow.execute_activity(
                activity,
                arg,
                result_type=result_type,
                start_to_close_timeout=start_to_close_timeout,
                retry_policy=retry_policy,
            )
        return await workflow.execute_local_activity(
            activity,
            arg,
            result_type=result_type,
            start_to_close_timeout=start_to_close_timeout,
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
