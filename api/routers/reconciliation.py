"""Reconciliation over HTTP: statements in, runs started and read, discrepancies listed
and resolved. Every route needs the `ops` scope: these are finance's and operations'.

- `POST /v1/statements` ingests one statement file (multipart, field `file`), then tells
  the statement stream, so that matching starts at once.
- `POST /v1/reconciliations` starts a run; `GET /v1/reconciliations/{id}` reads it, and
  `/report` renders it as an HTML page with a chart.
- `GET /v1/discrepancies` lists them; `POST /v1/discrepancies/{id}/resolve` sends the
  operator's resolution to the discrepancy's workflow (its `resolve` Update).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, File, Path, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse
from pydantic import AfterValidator, BaseModel, Field
from temporalio.client import (
    RPCTimeoutOrCancelledError,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.deps import OpsKey, SettingsDep, TemporalDep, get_temporal
from api.models import refuse_unstorable
from api.problems import COMMON_RESPONSES, ProblemError, workflow_unresponsive
from api.report import DayCount, ReportDiscrepancy, ReportRun, render_report
from ledger.db import to_libpq_url
from ledger.events import Actor, DiscrepancyType, Reason, Resolution
from paysaga.db import service_urls
from paysaga.reconciliation import (
    open_case,
    resolve_case,
    run_workflow_id,
    start_run,
    statement_arrived,
)
from paysaga.settings import Settings
from recon import cases
from recon.formats import StatementError, parse_statement
from recon.store import StatementConflict, ingest
from workflows.reconciliation_models import ResolveRequest, StatementArrived

log = logging.getLogger("paysaga.api")
router = APIRouter(tags=["reconciliation"], responses=COMMON_RESPONSES)

# A statement file is read whole into memory before it is parsed: this bounds it (the
# API's body limit for this one route, in api/app.py).
STATEMENT_BYTES_MAX = 20 * 1024 * 1024
DISCREPANCIES_LIMIT_MAX = 200
DISCREPANCIES_LIMIT_DEFAULT = 50
RUN_DISCREPANCIES_SHOWN_MAX = 500
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
DISCREPANCY_CURSOR_TAG = "d:"
CURSOR_CHARS_MAX = 120
# Asking Temporal whether a run not yet recorded has started.
RUN_DESCRIBE_TIMEOUT_S = 5.0
# Operators resolve with these; `posted_capture` and `matched_later` are reconciliation's.
OperatorResolution = Literal[
    "accepted", "corrected_at_source", "written_off", "duplicate_ignored", "false_positive"
]


@asynccontextmanager
async def _recon_db(settings: Settings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of the application role for one request (these routes are rare)."""
    conn = await psycopg.AsyncConnection.connect(
        to_libpq_url(service_urls(settings).app_url), autocommit=True
    )
    try:
        yield conn
    finally:
        await conn.close()


# --- statements ---------------------------------------------------------------------------
class StatementIngested(BaseModel):
    file_sha256: str
    format: str
    statements: int = Field(description="Statements in the file.")
    statements_new: int = Field(description="Of those, the ones not ingested before.")
    lines_new: int
    duplicate: bool = Field(description="The same bytes were ingested before: nothing added.")


@router.post(
    "/v1/statements",
    response_model=StatementIngested,
    status_code=201,
    responses={200: {"description": "The same file was ingested before; nothing was added."}},
)
async def upload_statement(
    response: Response,
    settings: SettingsDep,
    temporal: TemporalDep,
    key: OpsKey,
    file: Annotated[UploadFile, File(description="camt.053, MT940, BAI2 or processor CSV")],
) -> StatementIngested:
    """Ingest a statement (idempotent by content and by statement id), and start matching
    it at once. A file that cannot be read is refused whole, with the line or element."""
    content = await file.read(STATEMENT_BYTES_MAX + 1)
    if len(content) > STATEMENT_BYTES_MAX:
        raise ProblemError(
            413, "body_too_large", f"a statement is at most {STATEMENT_BYTES_MAX} bytes"
        )
    filename = (file.filename or "")[:255] or None
    try:
        parsed = await asyncio.to_thread(parse_statement, content, filename)
        async with _recon_db(settings) as conn:
            result = await ingest(conn, parsed, source="upload", filename=filename)
    except StatementConflict as error:
        raise ProblemError(409, "statement_conflict", str(error)) from None
    except StatementError as error:
        raise ProblemError(422, "invalid_statement", str(error)) from None
    if result.duplicate:
        response.status_code = 200
    else:
        try:
            await statement_arrived(
                temporal,
                settings,
                StatementArrived(source="upload", file_sha256=result.file_sha256),
            )
        except RPCError:  # the next scheduled run matches it
            log.warning("could not start matching the statement at once", exc_info=True)
    return StatementIngested(
        file_sha256=result.file_sha256,
        format=parsed.format,
        statements=len(parsed.statements),
        statements_new=result.statements_new,
        lines_new=result.lines_new,
        duplicate=result.duplicate,
    )


# --- runs ----------------------------------------------------------------------------------
class RunCreate(BaseModel):
    full: bool = Field(default=False, description="Match everything again, not only what is new.")


class RunStarted(BaseModel):
    id: str
    workflow_id: str
    status: Literal["running"]


class DiscrepancyOut(BaseModel):
    id: str
    type: DiscrepancyType
    status: Literal["open", "resolved"]
    run_id: str
    summary: str = Field(description="The problem in one sentence.")
    payment_id: str | None
    reference: str | None
    statement_amount_minor: int | None
    statement_currency: str | None
    ledger_amount_minor: int | None
    ledger_currency: str | None
    statement_line_id: int | None
    ledger_seq: int | None
    detected_at: datetime
    resolution: str | None
    resolution_note: str | None
    resolved_by: str | None
    resolved_at: datetime | None
    workflow_id: str = Field(description="Its DiscrepancyWorkflow in the Temporal UI.")


class RunOut(BaseModel):
    id: str
    kind: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, Any]
    discrepancies: list[DiscrepancyOut]
    report_url: str


def _discrepancy_out(row: cases.DiscrepancyRow) -> DiscrepancyOut:
    return DiscrepancyOut(
        id=row.discrepancy_id,
        type=row.discrepancy_type,
        status="resolved" if row.status == "resolved" else "open",
        run_id=row.run_id,
        summary=row.summary,
        payment_id=row.payment_id,
        reference=row.reference,
        statement_amount_minor=row.statement_amount_minor,
        statement_currency=row.statement_currency,
        ledger_amount_minor=row.ledger_amount_minor,
        ledger_currency=row.ledger_currency,
        statement_line_id=row.line_id,
        ledger_seq=row.ledger_seq,
        detected_at=row.detected_at,
        resolution=row.resolution,
        resolution_note=row.resolution_note,
        resolved_by=row.resolved_by,
        resolved_at=row.resolved_at,
        workflow_id=f"discrepancy-{row.discrepancy_id}",
    )


@router.post("/v1/reconciliations", response_model=RunStarted, status_code=202)
async def start_reconciliation(
    settings: SettingsDep, temporal: TemporalDep, key: OpsKey, body: RunCreate | None = None
) -> RunStarted:
    """Start a reconciliation run now (the schedules start them too)."""
    handle = await start_run(temporal, settings, kind="manual", full=bool(body and body.full))
    return RunStarted(
        id=handle.id.removeprefix("recon-run-"), workflow_id=handle.id, status="running"
    )


async def _run(settings: Settings, run_id: str) -> tuple[cases.RunRow, list[cases.DiscrepancyRow]]:
    async with _recon_db(settings) as conn:
        run = await cases.run(conn, run_id)
        if run is None:
            raise ProblemError(
                404,
                "reconciliation_not_found",
                f"no reconciliation run {run_id} (a run just started appears once it matches)",
            )
        found = await cases.list_discrepancies(
            conn, status=None, run_id=run_id, before=None, limit=RUN_DISCREPANCIES_SHOWN_MAX
        )
    return run, found


@router.get("/v1/reconciliations/{run_id}", response_model=RunOut)
async def get_reconciliation(
    request: Request,
    settings: SettingsDep,
    key: OpsKey,
    run_id: Annotated[str, Path(pattern=RUN_ID_PATTERN)],
) -> RunOut:
    """A run: its status, its counts and the discrepancies it found. A run just started
    (202) that has not recorded itself yet is `running`, with nothing counted."""
    try:
        run, found = await _run(settings, run_id)
    except ProblemError:
        started = await _run_workflow(request, run_id)
        if started is None:
            raise
        status, started_at = started
        if status != WorkflowExecutionStatus.RUNNING:
            # It ended since it was looked for: recorded by now, if it ever was.
            run, found = await _run(settings, run_id)
        else:
            run = cases.RunRow(
                run_id=run_id,
                kind=run_id.split("-", 1)[0],
                status="running",
                started_at=started_at,
                finished_at=None,
                counts={},
            )
            found = []
    return RunOut(
        id=run.run_id,
        kind=run.kind,
        status=run.status,
        started_at=run.started_at,
        finished_at=run.finished_at,
        counts=run.counts,
        discrepancies=[_discrepancy_out(row) for row in found],
        report_url=f"/v1/reconciliations/{run.run_id}/report",
    )


async def _run_workflow(
    request: Request, run_id: str
) -> tuple[WorkflowExecutionStatus | None, datetime] | None:
    """The run's workflow's status and start, if it was started. Temporal is asked only
    for a run not recorded yet, and a Temporal that cannot answer counts as no."""
    try:
        temporal = await get_temporal(request)
        described = await temporal.get_workflow_handle(run_workflow_id(run_id)).describe(
            rpc_timeout=timedelta(seconds=RUN_DESCRIBE_TIMEOUT_S)
        )
    except (ProblemError, RPCError):
        return None
    return described.status, described.start_time


def _side(amount_minor: int | None, currency: str | None) -> str:
    return cases.money(amount_minor, currency) if amount_minor is not None else "-"


@router.get(
    "/v1/reconciliations/{run_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "The report, as a page."}},
)
async def reconciliation_report(
    settings: SettingsDep,
    key: OpsKey,
    run_id: Annotated[str, Path(pattern=RUN_ID_PATTERN)],
) -> HTMLResponse:
    """The run as a page for people: its counts, a chart of matched lines against each
    discrepancy type per day, and every discrepancy it found."""
    run, found = await _run(settings, run_id)
    async with _recon_db(settings) as conn:
        days = await cases.daily_counts(conn, run_id)
    counts = {name: value for name, value in _flat(run.counts).items() if isinstance(value, int)}
    page = await asyncio.to_thread(
        render_report,
        ReportRun(
            run_id=run.run_id,
            kind=run.kind,
            status=run.status,
            started_at=run.started_at,
            completed_at=run.finished_at,
            counts=counts,
        ),
        [DayCount(day, series, n) for day, series, n in days],
        [
            ReportDiscrepancy(
                discrepancy_id=row.discrepancy_id,
                discrepancy_type=row.discrepancy_type,
                status=row.status,
                payment_id=row.payment_id,
                reference=row.reference,
                statement=_side(row.statement_amount_minor, row.statement_currency),
                ledger=_side(row.ledger_amount_minor, row.ledger_currency),
                summary=row.summary,
                detected_at=row.detected_at,
                resolution=row.resolution,
            )
            for row in found
        ],
    )
    return HTMLResponse(page)


def _flat(counts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"matched": {"exact": {"lines": 3}}}` as `{"matched exact lines": 3}`."""
    flat: dict[str, Any] = {}
    for name, value in counts.items():
        label = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{label} "))
        else:
            flat[label] = value
    return flat


# --- discrepancies -------------------------------------------------------------------------
class DiscrepancyList(BaseModel):
    discrepancies: list[DiscrepancyOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


def _encode(row: cases.DiscrepancyRow) -> str:
    raw = f"{DISCREPANCY_CURSOR_TAG}{row.detected_at.isoformat()}|{row.discrepancy_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode((cursor + "=" * (-len(cursor) % 4)).encode()).decode()
        if not raw.startswith(DISCREPANCY_CURSOR_TAG):
            raise ValueError(raw)
        at, _, discrepancy_id = raw.removeprefix(DISCREPANCY_CURSOR_TAG).partition("|")
        instant = datetime.fromisoformat(at)
        if instant.tzinfo is None:
            raise ValueError(at)
        return instant, str(uuid.UUID(discrepancy_id))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(
            400, "invalid_cursor", "the cursor is not one this API gave out"
        ) from None


@router.get("/v1/discrepancies", response_model=DiscrepancyList)
async def list_discrepancies(
    settings: SettingsDep,
    key: OpsKey,
    status: Annotated[Literal["open", "resolved"] | None, Query()] = None,
    run_id: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=DISCREPANCIES_LIMIT_MAX)] = DISCREPANCIES_LIMIT_DEFAULT,
    cursor: Annotated[str | None, Query(max_length=CURSOR_CHARS_MAX)] = None,
) -> DiscrepancyList:
    """Discrepancies, newest first, optionally only `open` or `resolved` ones, or one run's."""
    before = _decode(cursor) if cursor is not None else None
    async with _recon_db(settings) as conn:
        rows = await cases.list_discrepancies(
            conn, status=status, run_id=run_id, before=before, limit=limit + 1
        )
    return DiscrepancyList(
        discrepancies=[_discrepancy_out(row) for row in rows[:limit]],
        next_cursor=_encode(rows[limit - 1]) if len(rows) > limit else None,
    )


class ResolveIn(BaseModel):
    resolution: OperatorResolution
    # A NUL reached the workflow, whose ledger append then failed and was retried for
    # ever: the resolve call never answered. Refused here, as every request body does.
    note: Annotated[Reason, AfterValidator(refuse_unstorable)]


class ResolvedOut(BaseModel):
    id: str
    resolution: Resolution
    resolved_by: str
    automatic: bool


@router.post("/v1/discrepancies/{discrepancy_id}/resolve", response_model=ResolvedOut)
async def resolve_discrepancy(
    settings: SettingsDep,
    temporal: TemporalDep,
    key: OpsKey,
    discrepancy_id: uuid.UUID,
    body: ResolveIn,
) -> ResolvedOut:
    """Resolve an open discrepancy: its workflow records `DiscrepancyResolved` in the
    ledger, then this answers. 409 if it is already resolved."""
    async with _recon_db(settings) as conn:
        found = await cases.discrepancies(conn, [str(discrepancy_id)])
    if not found:
        raise ProblemError(404, "discrepancy_not_found", f"no discrepancy {discrepancy_id}")
    if found[0].status == "resolved":
        raise ProblemError(409, "already_resolved", "this discrepancy is already resolved")
    by: Actor = f"api-key:{key.key_id}"
    request = ResolveRequest(resolution=body.resolution, note=body.note, resolved_by=by)
    wait_s = settings.api_update_wait_s
    try:
        outcome = await resolve_case(temporal, str(discrepancy_id), request, wait_s=wait_s)
        if outcome is None and found[0].status == "open":
            # Its workflow is gone (an operator terminated it): start it again, then
            # resolve through it, so the resolution is recorded the one way it always is.
            with contextlib.suppress(WorkflowAlreadyStartedError):  # it completed meanwhile
                await open_case(temporal, settings.task_queue, found[0].case())
                outcome = await resolve_case(temporal, str(discrepancy_id), request, wait_s=wait_s)
    except WorkflowUpdateFailedError as error:
        raise ProblemError(422, "resolution_refused", str(error.cause or error)) from None
    except (TimeoutError, RPCTimeoutOrCancelledError):
        raise workflow_unresponsive("resolution", wait_s) from None
    if outcome is None:
        async with _recon_db(settings) as conn:
            found = await cases.discrepancies(conn, [str(discrepancy_id)])
        if found and found[0].status == "resolved":
            raise ProblemError(409, "already_resolved", "this discrepancy is already resolved")
        raise ProblemError(
            409,
            "discrepancy_not_ready",
            "this discrepancy's workflow is not running yet; try again in a moment",
        )
    return ResolvedOut(
        id=outcome.discrepancy_id,
        resolution=outcome.resolution,
        resolved_by=outcome.resolved_by,
        automatic=outcome.automatic,
    )
