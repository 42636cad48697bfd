"""Starting reconciliation from outside a workflow (API, CLI, the worker's inbox watch):
runs, the statement stream, and one workflow per discrepancy, each started one way only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from ledger.events import ReconciliationKind
from paysaga.settings import DEFAULT_TASK_QUEUE, Settings
from paysaga.temporal import execute_update_within
from workflows.models import workflow_id_for
from workflows.reconciliation import (
    STATEMENT_STREAM_ID,
    DiscrepancyWorkflow,
    ReconciliationWorkflow,
    StatementStreamWorkflow,
)
from workflows.reconciliation_models import (
    DiscrepancyCase,
    DiscrepancyOutcome,
    ReconciliationReport,
    ReconciliationRequest,
    ResolveRequest,
    StatementArrived,
)
from workflows.search_attributes import DISCREPANCY_TYPE

log = logging.getLogger("paysaga.reconciliation")

RUN_EXECUTION_TIMEOUT = timedelta(hours=2)
STREAM_EXECUTION_TIMEOUT = timedelta(days=365)
INBOX_SUBFOLDERS = ("done", "refused")


def run_workflow_id(run_id: str) -> str:
    return f"recon-run-{run_id}"


def discrepancy_workflow_id(discrepancy_id: str) -> str:
    return f"discrepancy-{discrepancy_id}"


def new_run_id(kind: ReconciliationKind) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}"


async def start_run(
    client: Client, settings: Settings, *, kind: ReconciliationKind = "manual", full: bool = False
) -> WorkflowHandle[ReconciliationWorkflow, ReconciliationReport]:
    """Start one reconciliation run now; its run id is the handle's workflow id's tail."""
    run_id = new_run_id(kind)
    return await client.start_workflow(
        ReconciliationWorkflow.run,
        ReconciliationRequest(kind=kind, full=full, run_id=run_id),
        id=run_workflow_id(run_id),
        task_queue=settings.task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        execution_timeout=RUN_EXECUTION_TIMEOUT,
        static_summary=f"{'Full' if full else 'Incremental'} reconciliation ({kind})",
    )


async def statement_arrived(client: Client, settings: Settings, arrival: StatementArrived) -> None:
    """Tell the statement stream that a statement arrived, starting it if it is not
    running: matching starts within moments, not at the next scheduled run."""
    await client.start_workflow(
        StatementStreamWorkflow.run,
        0,
        id=_stream_id(settings),
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        execution_timeout=STREAM_EXECUTION_TIMEOUT,
        start_signal="statement_arrived",
        start_signal_args=[arrival],
        static_summary="Matches statements as they arrive (uploads and the inbox)",
    )


def _stream_id(settings: Settings) -> str:
    if settings.task_queue == DEFAULT_TASK_QUEUE:
        return STATEMENT_STREAM_ID
    return f"{settings.task_queue}-{STATEMENT_STREAM_ID}"


async def open_case(
    client: Client, task_queue: str, case: DiscrepancyCase
) -> WorkflowHandle[DiscrepancyWorkflow, DiscrepancyOutcome]:
    """The discrepancy's workflow, if it is not running: one that completed (resolved)
    is never started again (its handle comes back); one that was terminated, cancelled
    or failed is. Its static details name the payment's workflow, where there is one,
    so the Temporal UI leads from the discrepancy to the payment."""
    workflow_id = discrepancy_workflow_id(case.discrepancy_id)
    try:
        return await client.start_workflow(
            DiscrepancyWorkflow.run,
            case,
            id=workflow_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(DISCREPANCY_TYPE, case.discrepancy_type)]
            ),
            static_summary=case.summary,
            static_details=case_details(case),
        )
    except WorkflowAlreadyStartedError:
        # Its workflow completed: the discrepancy was resolved, and stays so.
        return client.get_workflow_handle_for(DiscrepancyWorkflow.run, workflow_id)


def case_details(case: DiscrepancyCase) -> str:
    """What a discrepancy's workflow shows under its summary: the run that found it and
    the workflow id of the payment it concerns, if any."""
    details = f"Found by reconciliation run {case.run_id}"
    if case.payment_id is not None:
        details += f"\n\nPayment workflow: {workflow_id_for(case.payment_id)}"
    return details


async def resolve_case(
    client: Client,
    discrepancy_id: str,
    request: ResolveRequest,
    *,
    wait_s: float | None = None,
) -> DiscrepancyOutcome | None:
    """Resolve the discrepancy through its workflow's `resolve` Update; None if it was
    already resolved (or its workflow is closed). `wait_s` bounds the wait, as
    `execute_update_within` says."""
    handle = client.get_workflow_handle_for(
        DiscrepancyWorkflow.run, discrepancy_workflow_id(discrepancy_id)
    )
    try:
        return await execute_update_within(
            handle,
            DiscrepancyWorkflow.resolve,
            request,
            result_type=DiscrepancyOutcome,
            wait_s=wait_s,
        )
    except WorkflowUpdateFailedError as error:
        if _already_resolved(error):
            return None
        raise
    except RPCError as error:
        if error.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            return None
        raise


def _already_resolved(error: WorkflowUpdateFailedError) -> bool:
    cause = error.cause
    return isinstance(cause, ApplicationError) and cause.type == "already_resolved"


def inbox_files(inbox: Path) -> list[Path]:
    """Files waiting in the inbox, oldest first (not its done/ and refused/ folders, and
    not files still being written under a leading dot)."""
    if not inbox.is_dir():
        return []
    files = [p for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


async def watch_inbox(client: Client, settings: Settings, stop: asyncio.Event) -> None:
    """Until `stop`: signal the statement stream whenever new files wait in the inbox."""
    inbox = settings.recon_inbox_path
    for folder in INBOX_SUBFOLDERS:
        (inbox / folder).mkdir(parents=True, exist_ok=True)
    signalled: set[str] = set()
    while not stop.is_set():
        waiting = {p.name for p in inbox_files(inbox)}
        if waiting - signalled:
            try:
                await statement_arrived(client, settings, StatementArrived(source="inbox"))
                signalled = waiting
            except Exception:  # the next poll tries again; the schedule runs anyway
                log.exception("could not signal the statement stream")
        else:
            signalled &= waiting
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.recon_inbox_poll_s)
