"""Starting payments: the one place a PaymentWorkflow is started from (API, CLI, tests).

It sets what operations see in the Temporal UI from the first moment: the search
attributes, and a static summary that reads like a payment.
"""

from __future__ import annotations

from temporalio.client import Client, WithStartWorkflowOperation, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from paysaga.settings import Settings
from workflows.models import PaymentOutcome, PaymentPolicy, PaymentRequest, PaymentState
from workflows.payment import PaymentWorkflow, summary
from workflows.search_attributes import (
    PAYEE_ACCOUNT_ID,
    PAYER_ACCOUNT_ID,
    PAYMENT_AMOUNT_MINOR,
    PAYMENT_CURRENCY,
    PAYMENT_STATUS,
)


def policy_from_settings(settings: Settings) -> PaymentPolicy:
    """The configuration a payment captures when it starts."""
    return PaymentPolicy(
        approval_threshold_minor=settings.approval_threshold_minor,
        approval_deadline_s=settings.approval_deadline_s,
        hold_expiry_s=settings.hold_expiry_s,
        processor_timeout_s=settings.processor_timeout_s,
        processor_heartbeat_s=settings.processor_heartbeat_s,
        processor_attempts_max=settings.processor_attempts_max,
        risk_payment_limit_minor=settings.risk_payment_limit_minor,
        risk_velocity_window_s=settings.risk_velocity_window_s,
        risk_velocity_count_max=settings.risk_velocity_count_max,
        fee_bps=settings.fee_bps,
        fee_fixed_minor=settings.fee_fixed_minor,
        fees_account_id=settings.fees_account_id,
    )


def search_attributes(request: PaymentRequest) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(PAYMENT_STATUS, "INITIATED"),
            SearchAttributePair(PAYMENT_AMOUNT_MINOR, request.amount_minor),
            SearchAttributePair(PAYMENT_CURRENCY, request.currency),
            SearchAttributePair(PAYER_ACCOUNT_ID, request.payer_account_id),
            SearchAttributePair(PAYEE_ACCOUNT_ID, request.payee_account_id),
        ]
    )


async def start_payment(
    client: Client, request: PaymentRequest, *, task_queue: str
) -> WorkflowHandle[PaymentWorkflow, PaymentOutcome]:
    """Start the payment's workflow. A payment id can only ever be used once."""
    details = f"Reference: {request.reference}" if request.reference else None
    return await client.start_workflow(
        PaymentWorkflow.run,
        request,
        id=request.workflow_id,
        task_queue=task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=search_attributes(request),
        static_summary=summary(request),
        static_details=details,
    )


async def start_payment_and_wait(
    client: Client, request: PaymentRequest, *, task_queue: str
) -> PaymentState:
    """Start the payment and wait for it to end, in one call (update-with-start).

    bench/wait_settled.py compares this with `start_payment` then awaiting the result.
    """
    details = f"Reference: {request.reference}" if request.reference else None
    start = WithStartWorkflowOperation(
        PaymentWorkflow.run,
        request,
        id=request.workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=search_attributes(request),
        static_summary=summary(request),
        static_details=details,
    )
    return await client.execute_update_with_start_workflow(
        PaymentWorkflow.wait_ended, start_workflow_operation=start
    )
