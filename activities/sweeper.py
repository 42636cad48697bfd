"""The sweeper's activity: open payments whose workflow is gone, repaired from the ledger.

An operator may terminate a payment's workflow from the Temporal UI, a workflow may
time out or fail, and Temporal may forget one altogether. Its stream then stays open:
a hold held, an authorization alive at the processor, no terminal event. Each sweep
finds such payments (open in the ledger, not running in Temporal) and closes them
from the ledger's facts, exactly as the saga would (`close_payment`): release the
hold, void the authorization (the ledger first, then the processor), and append
PaymentFailed naming the cause and, where Temporal records one, who terminated it.
A hold past its expiry is named too.

A reserved payment is asked about at the processor first, as the saga's close does:
the processor fences off its capture, or says it captured it. A captured payment is
past the saga's pivot, so the sweeper settles it (PaymentSettled, with the payload its
saga would have posted, derived from the workflow's input as Temporal recorded it),
and never releases or voids it. If Temporal no longer knows the workflow, the
settlement cannot be derived: the payment is left open, named in the sweep's report,
and reconciliation reports the capture the ledger never posted.

A workflow can also close before its first step, so that the ledger never heard of a
payment the API acknowledged (an operator terminated it at once, say). Each sweep also
lists the payment workflows on its task queue that closed without completing
(terminated, cancelled, failed, timed out) within `UNRECORDED_LOOKBACK`, and records
and closes those the ledger does not know, from the request Temporal kept as the
workflow's input: PaymentInitiated, the processor fenced off (any late authorization is
declined), PaymentFailed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.ledger import LedgerActivities, close_payment
from activities.processor import Authorizer
from ledger.events import payment_stream
from ledger.state_machine import TERMINAL_STATES
from ledger.store import OpenPayment
from workflows.models import (
    Close,
    Closed,
    FenceRequest,
    PaymentRequest,
    RecordEvent,
    Repair,
    SweepReport,
    SweepRequest,
    VoidRequest,
    settlement_payload,
    workflow_id_for,
)

log = logging.getLogger("paysaga.sweeper")

SWEEPER_ACTOR = "sweeper"
DESCRIBE_TIMEOUT = timedelta(seconds=10)
# close_payment stops once per round for the processor (the capture fence, then the
# void); three rounds and a spare are enough unless something races the repair, which
# the next sweep finishes.
REPAIR_ROUNDS_MAX = 4
# How far back a sweep looks for payment workflows that closed before the ledger
# recorded their payment (a sweep runs every minute; a day covers a long outage).
UNRECORDED_LOOKBACK = timedelta(days=1)
UNRECORDED_STATUSES = ("Terminated", "Canceled", "Failed", "TimedOut")


class SettlementUnknown(Exception):
    """A captured payment's settlement cannot be derived: its workflow is gone from
    Temporal, and with it the policy that fixes the fee."""


class SweeperActivities:
    def __init__(self, ledger: LedgerActivities, authorizer: Authorizer, client: Client) -> None:
        self.ledger = ledger
        self.authorizer = authorizer
        self.client = client

    @activity.defn(name="sweeper.sweep")
    async def sweep(self, request: SweepRequest) -> SweepReport:
        """Check every idle open payment against Temporal; repair those whose workflow is gone."""
        candidates = await self.ledger.store.open_payments(
            idle_s=request.idle_s, limit=request.payments_max
        )
        repaired = []
        for payment in candidates:
            _heartbeat(payment.payment_id)
            gone = await self.workflow_gone(payment.payment_id)
            if gone is None or await self._closed_meanwhile(payment.payment_id):
                # Running, or its own workflow closed it after the listing above (it was
                # open then, and its workflow has completed since): nothing to repair.
                continue
            cause = _with_hold(payment, gone)
            try:
                closed = await self.repair(payment.payment_id, cause)
            except SettlementUnknown as unknown:
                log.error(
                    "a captured payment whose workflow is gone cannot be settled here",
                    extra={"payment_id": payment.payment_id, "cause": str(unknown)},
                )
                repaired.append(
                    Repair(payment_id=payment.payment_id, cause=str(unknown), status="RESERVED")
                )
                continue
            if closed.status == "SETTLED":
                cause = f"{cause}; the processor had captured it, so it was settled"
            log.warning(
                "repaired a payment whose workflow is gone",
                extra={"payment_id": payment.payment_id, "cause": cause, "status": closed.status},
            )
            repaired.append(
                Repair(payment_id=payment.payment_id, cause=cause, status=closed.status)
            )
        unrecorded = await self._repair_unrecorded(request.payments_max)
        return SweepReport(
            checked=len(candidates) + len(unrecorded), repaired=[*repaired, *unrecorded]
        )

    async def _repair_unrecorded(self, limit: int) -> list[Repair]:
        """Record and close the payments whose workflow closed before the ledger heard of
        them (the sweep's own task queue only)."""
        if not activity.in_activity():
            return []
        repaired = []
        for payment_id in await self.unrecorded_payments(activity.info().task_queue, limit):
            _heartbeat(payment_id)
            # The latest run decides: a reset may be running the payment again.
            gone = await self.workflow_gone(payment_id)
            if gone is None:
                continue
            request = await self._payment_request(payment_id)
            if request is None:
                continue
            cause = f"{gone}, before the ledger recorded the payment"
            closed = await self.repair(payment_id, cause, initiate=request)
            log.warning(
                "recorded and closed a payment whose workflow ended before its first step",
                extra={"payment_id": payment_id, "cause": cause, "status": closed.status},
            )
            repaired.append(Repair(payment_id=payment_id, cause=cause, status=closed.status))
        return repaired

    async def unrecorded_payments(self, task_queue: str, limit: int) -> list[str]:
        """Payments on `task_queue` whose workflow closed without completing within
        UNRECORDED_LOOKBACK, and that the ledger has no stream for."""
        since = (datetime.now(UTC) - UNRECORDED_LOOKBACK).strftime("%Y-%m-%dT%H:%M:%SZ")
        statuses = " OR ".join(f"ExecutionStatus = '{status}'" for status in UNRECORDED_STATUSES)
        query = (
            f"WorkflowType = 'PaymentWorkflow' AND TaskQueue = '{_quoted(task_queue)}' "
            f"AND ({statuses}) AND CloseTime > '{since}'"
        )
        found: list[str] = []
        seen: set[str] = set()
        async for execution in self.client.list_workflows(
            query, limit=limit, rpc_timeout=DESCRIBE_TIMEOUT
        ):
            payment_id = execution.id.removeprefix("payment-")
            if payment_id in seen:
                continue
            seen.add(payment_id)
            if await self.ledger.store.stream_head(payment_stream(payment_id)) is None:
                found.append(payment_id)
        return found

    async def _closed_meanwhile(self, payment_id: str) -> bool:
        head = await self.ledger.store.stream_head(payment_stream(payment_id))
        return head is not None and head.state in TERMINAL_STATES

    async def repair(
        self, payment_id: str, cause: str, *, initiate: PaymentRequest | None = None
    ) -> Closed:
        """Close a payment from the ledger's facts: settle it if the processor captured
        it, else fence off its capture, compensate, and void at the processor once the
        ledger says the payment can no longer settle. With `initiate`, a payment the
        ledger does not know is recorded first."""
        close = Close(
            payment_id=payment_id,
            status="FAILED",
            step="repair",
            reason=cause,
            actor=SWEEPER_ACTOR,
            initiate=initiate,
        )
        for _ in range(REPAIR_ROUNDS_MAX):
            closed = await close_payment(self.ledger, close)
            if closed.closed:
                return closed
            if closed.needs_capture_fence:
                fence = await self.authorizer.fence_capture(
                    FenceRequest(payment_id=payment_id, reason=cause), 1
                )
                if fence.captured:
                    return await self._settle(payment_id, cause)
                close = close.model_copy(update={"capture_fenced": True})
                continue
            await self.authorizer.void(VoidRequest(payment_id=payment_id, reason=cause), 1)
            close = close.model_copy(update={"processor_voided": True})
        raise RuntimeError(f"payment {payment_id} did not close; the next sweep goes on")

    async def settle_if_captured(self, payment_id: str) -> str | None:
        """Post a captured payment's settlement that the ledger is missing (reconciliation's
        automatic fix for missing_in_ledger); what was done, or None if it cannot be.

        Only a payment the ledger has reserved, and the processor has captured, is
        settled, with the saga's own event (same id and payload: a saga still retrying
        its posting finds it there). It asks the processor without fencing anything, so a
        payment whose capture is still on its way is left to its saga.
        """
        head = await self.ledger.store.stream_head(payment_stream(payment_id))
        if head is None or head.state != "reserved":
            return None
        capture_id = await self.authorizer.capture_of(payment_id)
        if capture_id is None:
            return None
        try:
            await self._settle(payment_id, f"captured at the processor ({capture_id})")
        except SettlementUnknown:
            return None
        return (
            f"posted PaymentSettled for the processor's capture {capture_id}, "
            "which the ledger was missing"
        )

    async def _settle(self, payment_id: str, cause: str) -> Closed:
        """Post the PaymentSettled the payment's saga would have posted (same step, so the
        same event id and payload: a saga that comes back later finds it there)."""
        request = await self._payment_request(payment_id)
        if request is None:
            raise SettlementUnknown(
                f"{cause}; the processor captured it, but Temporal no longer has its "
                "workflow, so its settlement (the fee) cannot be derived: left open for "
                "reconciliation"
            )
        recorded = await self.ledger.record(
            RecordEvent(
                payment_id=payment_id,
                step="settle",
                event_type="PaymentSettled",
                payload=settlement_payload(request),
                actor=SWEEPER_ACTOR,
                causation_id=None,
            )
        )
        return Closed(closed=True, state=recorded.state, status="SETTLED")

    async def _payment_request(self, payment_id: str) -> PaymentRequest | None:
        """The payment's request as its workflow's latest run was started with it."""
        handle = self.client.get_workflow_handle(workflow_id_for(payment_id))
        try:
            async for event in handle.fetch_history_events(
                page_size=1, rpc_timeout=DESCRIBE_TIMEOUT
            ):
                if not event.HasField("workflow_execution_started_event_attributes"):
                    return None
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                decoded = await self.client.data_converter.decode(payloads, [PaymentRequest])
                request = decoded[0]
                return request if isinstance(request, PaymentRequest) else None
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        return None

    async def workflow_gone(self, payment_id: str) -> str | None:
        """Why the payment's workflow no longer runs, or None if it does."""
        handle = self.client.get_workflow_handle(f"payment-{payment_id}")
        try:
            described = await handle.describe(rpc_timeout=DESCRIBE_TIMEOUT)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return "its workflow is unknown to Temporal"
            raise
        status = described.status
        if status in (WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.CONTINUED_AS_NEW):
            return None
        if status == WorkflowExecutionStatus.TERMINATED:
            identity, reason = await self._termination(payment_id, described.run_id)
            by = f" by {identity}" if identity else ""
            return f"its workflow was terminated{by}" + (f": {reason}" if reason else "")
        if status == WorkflowExecutionStatus.TIMED_OUT:
            return "its workflow timed out"
        if status == WorkflowExecutionStatus.CANCELED:
            return "its workflow was cancelled before it closed the payment"
        if status == WorkflowExecutionStatus.FAILED:
            return "its workflow failed before it closed the payment"
        return f"its workflow ended ({status.name if status else 'unknown'}) with the payment open"

    async def _termination(self, payment_id: str, run_id: str | None) -> tuple[str, str]:
        """Who terminated the workflow, and why, from its last history event."""
        response = await self.client.workflow_service.get_workflow_execution_history_reverse(
            GetWorkflowExecutionHistoryReverseRequest(
                namespace=self.client.namespace,
                execution=WorkflowExecution(
                    workflow_id=f"payment-{payment_id}", run_id=run_id or ""
                ),
                maximum_page_size=1,
            ),
            timeout=DESCRIBE_TIMEOUT,
        )
        for event in response.history.events:
            if event.HasField("workflow_execution_terminated_event_attributes"):
                attributes = event.workflow_execution_terminated_event_attributes
                return attributes.identity, attributes.reason
        return "", ""

    def all(self) -> list[object]:
        return [self.sweep]


def _quoted(value: str) -> str:
    """A string for a visibility query's single quotes."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _with_hold(payment: OpenPayment, cause: str) -> str:
    expires_at = payment.hold_expires_at
    if payment.state == "reserved" and expires_at is not None and expires_at < datetime.now(UTC):
        return f"its hold expired at {expires_at.isoformat()} and {cause}"
    return cause


def _heartbeat(details: str) -> None:
    if activity.in_activity():
        activity.heartbeat(details)
