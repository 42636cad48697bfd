"""Reconciliation as Temporal workflows: runs, the stream of arriving statements, and one
workflow per discrepancy.

- `ReconciliationWorkflow` is one run: it ingests what waits in the inbox, matches what
  is new or still open (`recon.matching`, in SQL), checks the ledger against itself,
  records the run in the ledger (`DiscrepancyDetected` per difference, then
  `ReconciliationCompleted`) and opens a `DiscrepancyWorkflow` for each difference.
  The schedules `recon-continuous` and `recon-daily` start it (worker.py); so do
  `POST /v1/reconciliations` and `paysaga recon run`.
- `StatementStreamWorkflow` (`recon-statements`) is how a statement is matched within
  seconds of arriving, not at the next tick: an upload, or a file dropped in the inbox,
  signals it with start, and it runs a `ReconciliationWorkflow` of kind `statement`
  for what arrived.
- `DiscrepancyWorkflow` (`discrepancy-<id>`, search attribute `DiscrepancyType`) fixes
  its discrepancy where that is safe (a capture the ledger never posted is posted), or
  waits for an operator's `resolve` Update; either way it appends `DiscrepancyResolved`.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from ledger.events import RUN_ID_PATTERN
    from workflows.reconciliation_models import (
        AutoFix,
        DiscrepancyCase,
        DiscrepancyOutcome,
        IngestReport,
        ReconcileInput,
        ReconciliationProgress,
        ReconciliationReport,
        ReconciliationRequest,
        RecordResolution,
        ResolveRequest,
        RunSummary,
        StatementArrived,
    )

STATEMENT_STREAM_ID = "recon-statements"
RUN_ID = re.compile(RUN_ID_PATTERN)
# A statement pass waits this long for more arrivals before it runs: files dropped
# together are matched together.
STATEMENT_SETTLE = timedelta(milliseconds=200)
# The stream workflow starts afresh after this many passes, to keep its history short.
STATEMENT_PASSES_PER_RUN_MAX = 100
# How long the stream workflow idles before it ends; the next arrival starts it again.
STATEMENT_IDLE = timedelta(hours=1)

INGEST_TIMEOUT = timedelta(minutes=10)
RECONCILE_TIMEOUT = timedelta(minutes=30)
RECORD_TIMEOUT = timedelta(minutes=30)
HEARTBEAT_TIMEOUT = timedelta(seconds=60)
FIX_TIMEOUT = timedelta(minutes=2)
CHILD_RUN_TIMEOUT = timedelta(hours=1)
# Transient failures (a database restart, a Temporal hiccup) are retried, with a bound:
# the next scheduled run goes on from the same checkpoints.
RUN_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
)
# Recording a resolution is retried until it lands: the operator's decision is never lost.
RESOLVE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)


def run_id_for(workflow_id: str, kind: str) -> str:
    """A run's id: its workflow's id (a schedule's `recon-continuous-<time>`), or, where
    that is too long for a stream name, the kind and a digest of it. Either way a
    reset re-run of the workflow is the same run, and records nothing twice."""
    if RUN_ID.match(workflow_id):
        return workflow_id
    return f"{kind}-{hashlib.sha256(workflow_id.encode()).hexdigest()[:24]}"


@workflow.defn(name="ReconciliationWorkflow")
class ReconciliationWorkflow:
    def __init__(self) -> None:
        self._progress = ReconciliationProgress(run_id="", stage="starting")

    @workflow.query
    def progress(self) -> ReconciliationProgress:
        return self._progress

    @workflow.run
    async def run(self, request: ReconciliationRequest) -> ReconciliationReport:
        run_id = request.run_id or run_id_for(workflow.info().workflow_id, request.kind)
        self._stage(run_id, "ingesting the inbox")
        ingested: IngestReport = await workflow.execute_activity(
            "recon.ingest_inbox",
            run_id,
            result_type=IngestReport,
            start_to_close_timeout=INGEST_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RUN_RETRY,
        )
        self._stage(run_id, "matching")
        summary: RunSummary = await workflow.execute_activity(
            "recon.reconcile",
            ReconcileInput(run_id=run_id, kind=request.kind, full=request.full, now=workflow.now()),
            result_type=RunSummary,
            start_to_close_timeout=RECONCILE_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RUN_RETRY,
        )
        self._stage(run_id, f"recording {len(summary.discrepancy_ids)} discrepancies")
        await workflow.execute_activity(
            "recon.record",
            summary,
            result_type=int,
            start_to_close_timeout=RECORD_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RUN_RETRY,
        )
        self._stage(run_id, "opening a workflow per discrepancy")
        opened: int = await workflow.execute_activity(
            "recon.open_cases",
            summary,
            result_type=int,
            start_to_close_timeout=RECORD_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RUN_RETRY,
        )
        self._progress = ReconciliationProgress(run_id=run_id, stage="done", done=True)
        return ReconciliationReport(
            run_id=run_id,
            kind=request.kind,
            ingested=ingested,
            counts=summary.counts,
            discrepancies=len(summary.discrepancy_ids),
            cases_opened=opened,
        )

    def _stage(self, run_id: str, stage: str) -> None:
        self._progress = ReconciliationProgress(run_id=run_id, stage=stage)
        workflow.set_current_details(f"Reconciliation {run_id}: {stage}")


@workflow.defn(name="StatementStreamWorkflow")
class StatementStreamWorkflow:
    """Matches statements as they arrive: each arrival (a signal) leads to a run of kind
    `statement` within moments. Arrivals during a run lead to one more run after it."""

    def __init__(self) -> None:
        self._arrived = 0
        self._passes = 0

    @workflow.signal(name="statement_arrived")
    def statement_arrived(self, arrival: StatementArrived) -> None:
        self._arrived += 1

    @workflow.run
    async def run(self, passes_done: int = 0) -> int:
        self._passes = passes_done
        while True:
            try:
                await workflow.wait_condition(lambda: self._arrived > 0, timeout=STATEMENT_IDLE)
            except TimeoutError:
                return self._passes
            await workflow.sleep(STATEMENT_SETTLE)
            self._arrived = 0
            self._passes += 1
            run_id = f"statement-{workflow.info().run_id[:13]}-{self._passes}"
            try:
                await workflow.execute_child_workflow(
                    ReconciliationWorkflow.run,
                    ReconciliationRequest(kind="statement", run_id=run_id),
                    id=f"{workflow.info().workflow_id}-{run_id}",
                    execution_timeout=CHILD_RUN_TIMEOUT,
                    retry_policy=RetryPolicy(maximum_attempts=1),
                    static_summary=f"Reconciliation of arriving statements, pass {self._passes}",
                )
            except ChildWorkflowError:
                # The stream goes on: the next arrival, or the next scheduled run, matches
                # what this pass could not.
                workflow.logger.warning("a statement pass failed", exc_info=True)
            if self._passes - passes_done >= STATEMENT_PASSES_PER_RUN_MAX and self._arrived == 0:
                workflow.continue_as_new(self._passes)


@workflow.defn(name="DiscrepancyWorkflow")
class DiscrepancyWorkflow:
    def __init__(self) -> None:
        self._request: ResolveRequest | None = None
        self._outcome: DiscrepancyOutcome | None = None
        self._waiting = False

    @workflow.run
    async def run(self, case: DiscrepancyCase) -> DiscrepancyOutcome:
        fix: AutoFix = await workflow.execute_activity(
            "recon.auto_fix",
            case,
            result_type=AutoFix,
            start_to_close_timeout=FIX_TIMEOUT,
            retry_policy=RUN_RETRY,
        )
        if fix.fixed and fix.resolution is not None:
            record = RecordResolution(
                case=case,
                resolution=fix.resolution,
                note=fix.note or "fixed automatically",
                resolved_by="reconciliation",
                evidence_line_id=fix.evidence_line_id,
            )
        else:
            self._waiting = True
            workflow.set_current_details(
                f"{case.summary}\n\nWaiting for an operator's `resolve` Update."
            )
            await workflow.wait_condition(lambda: self._request is not None)
            assert self._request is not None
            record = RecordResolution(
                case=case,
                resolution=self._request.resolution,
                note=self._request.note,
                resolved_by=self._request.resolved_by,
            )
        self._outcome = await workflow.execute_activity(
            "recon.resolve",
            record,
            result_type=DiscrepancyOutcome,
            start_to_close_timeout=FIX_TIMEOUT,
            retry_policy=RESOLVE_RETRY,
        )
        workflow.set_current_details(
            f"{case.summary}\n\nResolved: {record.resolution} by {record.resolved_by}."
        )
        return self._outcome

    @workflow.update
    async def resolve(self, request: ResolveRequest) -> DiscrepancyOutcome:
        """An operator's resolution; returns once it is recorded in the ledger."""
        self._request = request
        await workflow.wait_condition(lambda: self._outcome is not None)
        assert self._outcome is not None
        return self._outcome

    @resolve.validator
    def _validate_resolve(self, request: ResolveRequest) -> None:
        if self._request is not None or self._outcome is not None:
            raise ApplicationError("this discrepancy is already resolved", type="already_resolved")
        if request.resolution == "posted_capture":
            raise ValueError("posted_capture is the workflow's own fix, not an operator's")
        if request.resolution == "matched_later" and request.resolved_by != "reconciliation":
            raise ValueError("matched_later is reconciliation's own finding, not an operator's")

    @workflow.query
    def waiting_for_operator(self) -> bool:
        return self._waiting and self._outcome is None


if __name__ == "__main__":
    raise SystemExit("workflow definitions are loaded by the worker, not run directly")
