"""Reconciliation's inputs, outputs and messages: one typed model per purpose."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ledger.events import (
    Actor,
    DiscrepancyId,
    DiscrepancyType,
    PaymentId,
    Reason,
    ReconciliationKind,
    Resolution,
    RunId,
)

Count = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReconciliationRequest(_Model):
    """One run. `full` matches everything again, not only what is new or still open; the
    run id defaults to the workflow id (a reset re-run is the same run, and records
    nothing twice)."""

    kind: ReconciliationKind
    full: bool = False
    run_id: RunId | None = None


class ReconcileInput(_Model):
    run_id: RunId
    kind: ReconciliationKind
    full: bool
    # The run's clock, from the workflow: what is past the settlement window is decided
    # once, and a retried activity decides the same.
    now: datetime


class IngestReport(_Model):
    files_ingested: Count = 0
    files_known: Count = 0
    files_refused: Count = 0
    lines_new: Count = 0
    refused: list[str] = Field(default_factory=list)


class RunSummary(_Model):
    """What a run found, as stored in `recon.runs` (so that a retried activity and a
    reset re-run see the same)."""

    run_id: RunId
    kind: ReconciliationKind
    counts: dict[str, int]
    discrepancy_ids: list[DiscrepancyId]
    # Open discrepancies this run matched after all: their workflows are resolved.
    now_matched: list[DiscrepancyId] = Field(default_factory=list)
    line_checkpoint: Count
    item_checkpoint: Count


class ReconciliationReport(_Model):
    run_id: RunId
    kind: ReconciliationKind
    ingested: IngestReport
    counts: dict[str, int]
    discrepancies: Count
    cases_opened: Count


class ReconciliationProgress(_Model):
    """What the run is doing, for `paysaga recon run` and the UI's query tab."""

    run_id: str
    stage: str
    done: bool = False


class StatementArrived(_Model):
    """A statement was ingested (uploaded) or dropped in the inbox."""

    source: str
    file_sha256: str | None = None


class DiscrepancyCase(_Model):
    """One discrepancy, as its workflow works it."""

    discrepancy_id: DiscrepancyId
    run_id: RunId
    discrepancy_type: DiscrepancyType
    payment_id: PaymentId | None = None
    summary: Annotated[str, Field(min_length=1, max_length=400)]


class AutoFix(_Model):
    """Whether the workflow closed the discrepancy itself, and on what evidence."""

    fixed: bool
    resolution: Resolution | None = None
    note: str | None = None
    evidence_line_id: int | None = None


class ResolveRequest(_Model):
    """An operator's resolution (the `resolve` Update)."""

    resolution: Resolution
    note: Reason
    resolved_by: Actor


class RecordResolution(_Model):
    case: DiscrepancyCase
    resolution: Resolution
    note: Reason
    resolved_by: Actor
    evidence_line_id: int | None = None


class DiscrepancyOutcome(_Model):
    discrepancy_id: DiscrepancyId
    resolution: Resolution
    resolved_by: Actor
    automatic: bool
