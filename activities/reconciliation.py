"""Reconciliation's activities: ingest the inbox, match, check the ledger against itself,
record what was found in the ledger, and open and close one workflow per discrepancy.

Every one is idempotent. A run's results are stored under its run id before anything
is recorded from them, so a retried activity, or a reset re-run of the workflow,
records the same events (their ids are functions of the run and the discrepancy) and
finds nothing new.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psycopg
from temporalio import activity
from temporalio.client import Client

from activities.sweeper import SweeperActivities
from ledger.db import to_libpq_url
from ledger.events import (
    PAYMENT_ID_PATTERN,
    DiscrepancyDetected,
    DiscrepancyResolved,
    ReconciliationCompleted,
    Resolution,
    event_id_for,
    payment_stream,
    recon_stream,
)
from ledger.store import EventStore, NewEvent
from ledger.verify import Report, SealPoint, check_ledger, verify_chain, verify_seal_since
from paysaga.reconciliation import inbox_files, open_case, resolve_case
from recon import cases
from recon.formats import StatementError, parse_statement
from recon.matching import reconcile
from recon.rules import MatchRules
from recon.store import ingest
from workflows.reconciliation_models import (
    AutoFix,
    DiscrepancyCase,
    DiscrepancyOutcome,
    IngestReport,
    ReconcileInput,
    RecordResolution,
    ResolveRequest,
    RunSummary,
)

log = logging.getLogger("paysaga.reconciliation")
PAYMENT_ID = re.compile(PAYMENT_ID_PATTERN)

ACTOR = "reconciliation"
# A statement file bigger than this is refused unread.
INBOX_FILE_BYTES_MAX = 50 * 1024 * 1024
# Files one run ingests from the inbox at most; the next run takes the rest.
INBOX_FILES_PER_RUN_MAX = 200
# Open payments whose workflow is checked, per run, at most.
OPEN_PAYMENTS_CHECKED_MAX = 1_000
# Violations of one internal check that become discrepancies, per run, at most.
INTERNAL_FINDINGS_MAX = 100


@dataclass(frozen=True)
class ReconciliationConfig:
    app_url: str  # the application role's login, as SQLAlchemy writes it
    inbox: Path
    task_queue: str
    rules: MatchRules
    # An open payment idle this long with no running workflow is internal drift.
    open_payment_idle_s: float


class ReconciliationActivities:
    def __init__(
        self,
        store: EventStore,
        client: Client,
        sweeper: SweeperActivities,
        config: ReconciliationConfig,
    ) -> None:
        self.store = store
        self.client = client
        self.sweeper = sweeper
        self.config = config

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await psycopg.AsyncConnection.connect(
            to_libpq_url(self.config.app_url), autocommit=True
        )
        try:
            yield conn
        finally:
            await conn.close()

    # --- a run ----------------------------------------------------------------------------
    @activity.defn(name="recon.ingest_inbox")
    async def ingest_inbox(self, run_id: str) -> IngestReport:
        """Ingest each file waiting in the inbox, then move it to `done/` (or, if it cannot
        be read, to `refused/` with the reason beside it). A file ingested before a crash
        is known by its hash the second time, and only moved."""
        inbox = self.config.inbox
        ingested = known = refused_count = lines = 0
        refused: list[str] = []
        async with self._connect() as conn:
            for path in inbox_files(inbox)[:INBOX_FILES_PER_RUN_MAX]:
                _heartbeat(path.name)
                try:
                    parsed = parse_statement(_read_capped(path), path.name)
                    result = await ingest(conn, parsed, source="inbox", filename=path.name)
                except (StatementError, ValueError) as error:
                    refused_count += 1
                    refused.append(f"{path.name}: {error}")
                    _move(path, inbox / "refused", reason=str(error))
                    continue
                if result.duplicate:
                    known += 1
                else:
                    ingested += 1
                    lines += result.lines_new
                _move(path, inbox / "done")
        return IngestReport(
            files_ingested=ingested,
            files_known=known,
            files_refused=refused_count,
            lines_new=lines,
            refused=refused[:20],
        )

    @activity.defn(name="recon.reconcile")
    async def reconcile(self, request: ReconcileInput) -> RunSummary:
        """Match what is new or still open, then check the ledger against itself. A run
        id that already completed matches nothing again: its stored results come back."""
        async with self._connect() as conn:
            result = await reconcile(
                conn,
                request.run_id,
                rules=self.config.rules,
                full=request.full,
                now=request.now,
                progress=_heartbeat,
            )
            # The internal checks fold the whole ledger: the scheduled and manual runs do
            # them, not each pass over an arriving statement.
            checks = not result.replayed and request.kind != "statement"
            findings = (
                await self._internal_checks(conn, request.run_id, request.full) if checks else []
            )
            drift = await cases.record_internal_drift(conn, request.run_id, findings, request.now)
        counts = {
            "lines_considered": result.lines_considered,
            "items_considered": result.items_considered,
            "lines_matched": result.lines_matched,
            "items_matched": result.items_matched,
            "lines_unmatched": max(result.lines_considered - result.lines_matched, 0),
            "items_unmatched": max(result.items_considered - result.items_matched, 0),
            **{f"matched_{rule}": count.matches for rule, count in result.matched.items()},
            **{name: int(n) for name, n in result.discrepancy_counts.items()},
            "internal_drift": len(drift),
        }
        return RunSummary(
            run_id=request.run_id,
            kind=request.kind,
            counts=counts,
            discrepancy_ids=[d.discrepancy_id for d in result.discrepancies] + drift,
            now_matched=list(result.now_matched),
            line_checkpoint=result.line_checkpoint,
            item_checkpoint=result.item_checkpoint,
        )

    async def _internal_checks(
        self, conn: psycopg.AsyncConnection[Any], run_id: str, full: bool
    ) -> list[cases.Finding]:
        """Positions and read models against a fold of the events, the seal, and open
        payments whose workflow no longer runs. A full run walks every chain and every
        block; the others verify the blocks sealed since the last verified one."""
        findings: list[cases.Finding] = []
        for report in (
            await check_ledger(self.store.engine),
            await self._verify_seal(conn, run_id, full),
        ):
            findings += [
                cases.Finding(
                    check=f"{report.name}/{violation.rule}",
                    subject=violation.stream_id or str(violation.global_seq or ""),
                    description=f"ledger {report.name}, {violation.rule}: {violation.message}",
                )
                for violation in report.violations[:INTERNAL_FINDINGS_MAX]
            ]
            _heartbeat(f"ledger {report.name} done")
        open_payments = await self.store.open_payments(
            idle_s=self.config.open_payment_idle_s, limit=OPEN_PAYMENTS_CHECKED_MAX
        )
        for payment in open_payments:
            gone = await self.sweeper.workflow_gone(payment.payment_id)
            if gone is not None:
                findings.append(
                    cases.Finding(
                        check="open-payment-without-workflow",
                        subject=payment.payment_id,
                        description=(
                            f"payment {payment.payment_id} is open ({payment.state}) but "
                            f"{gone}; the sweeper repairs it"
                        ),
                        payment_id=payment.payment_id,
                    )
                )
        return findings

    async def _verify_seal(
        self, conn: psycopg.AsyncConnection[Any], run_id: str, full: bool
    ) -> Report:
        since = None if full else await seal_checkpoint(conn)
        if full:
            report = await verify_chain(self.store.engine)
            point = report.seal_point
        else:
            report, point = await verify_seal_since(self.store.engine, since)
        if report.ok and point is not None and point != since:
            await conn.execute(
                "INSERT INTO recon.seal_verifications (run_id, block_no, last_seq, hash, full_run)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING",
                (run_id, point.block_no, point.last_seq, point.hash, full),
            )
        return report

    @activity.defn(name="recon.record")
    async def record(self, summary: RunSummary) -> int:
        """Append the run's DiscrepancyDetected events, then its ReconciliationCompleted,
        on its stream. Appending again appends nothing (deterministic event ids)."""
        stream = recon_stream(summary.run_id)
        appended = 0
        async with self._connect() as conn:
            found = await cases.discrepancies(conn, summary.discrepancy_ids)
        for item in found:
            _heartbeat(item.discrepancy_id)
            result = await self.store.append(
                NewEvent(
                    stream_id=stream,
                    event=DiscrepancyDetected(
                        run_id=summary.run_id,
                        discrepancy_id=item.discrepancy_id,
                        discrepancy_type=item.discrepancy_type,
                        payment_id=item.payment_id,
                        reference=item.reference,
                        statement_amount_minor=item.statement_amount_minor,
                        statement_currency=item.statement_currency,
                        ledger_amount_minor=item.ledger_amount_minor,
                        ledger_currency=item.ledger_currency,
                        statement_line_id=item.line_id,
                        ledger_seq=item.ledger_seq,
                        description=item.summary,
                    ),
                    event_id=event_id_for(stream, f"detected/{item.discrepancy_id}"),
                    actor=ACTOR,
                    correlation_id=_workflow_id(),
                )
            )
            appended += int(result.appended)
        counts = summary.counts
        result = await self.store.append(
            NewEvent(
                stream_id=stream,
                event=ReconciliationCompleted(
                    run_id=summary.run_id,
                    kind=summary.kind,
                    lines_matched=counts.get("lines_matched", 0),
                    items_matched=counts.get("items_matched", 0),
                    lines_unmatched=counts.get("lines_unmatched", 0),
                    items_unmatched=counts.get("items_unmatched", 0),
                    discrepancies=len(summary.discrepancy_ids),
                    missing_in_ledger=counts.get("missing_in_ledger", 0),
                    missing_in_statement=counts.get("missing_in_statement", 0),
                    amount_mismatch=counts.get("amount_mismatch", 0),
                    currency_mismatch=counts.get("currency_mismatch", 0),
                    duplicate_in_statement=counts.get("duplicate_in_statement", 0),
                    internal_drift=counts.get("internal_drift", 0),
                    line_checkpoint=summary.line_checkpoint,
                    item_checkpoint=summary.item_checkpoint,
                ),
                event_id=event_id_for(stream, "completed"),
                actor=ACTOR,
                correlation_id=_workflow_id(),
            )
        )
        return appended + int(result.appended)

    @activity.defn(name="recon.open_cases")
    async def open_cases(self, summary: RunSummary) -> int:
        """A DiscrepancyWorkflow for each of the run's discrepancies (started once ever);
        and the workflows of open discrepancies this run matched after all (a late line,
        a capture posted since) are resolved as `matched_later`."""
        async with self._connect() as conn:
            found = await cases.discrepancies(conn, summary.discrepancy_ids)
        for item in found:
            _heartbeat(item.discrepancy_id)
            await open_case(self.client, self.config.task_queue, item.case(summary.run_id))
        for discrepancy_id in summary.now_matched:
            _heartbeat(discrepancy_id)
            await resolve_case(
                self.client,
                discrepancy_id,
                ResolveRequest(
                    resolution="matched_later",
                    note=f"matched by reconciliation run {summary.run_id}",
                    resolved_by=ACTOR,
                ),
            )
        return len(found)

    # --- one discrepancy ------------------------------------------------------------------
    @activity.defn(name="recon.auto_fix")
    async def auto_fix(self, case: DiscrepancyCase) -> AutoFix:
        """Fix the discrepancy where that is safe; otherwise leave it to an operator."""
        async with self._connect() as conn:
            item = (await cases.discrepancies(conn, [case.discrepancy_id]))[0]
        # A line the ledger lacks names its payment by reference (the end-to-end id).
        payment_id = item.payment_id or item.reference
        if item.discrepancy_type != "missing_in_ledger" or not _is_payment_id(payment_id):
            return AutoFix(fixed=False)
        assert payment_id is not None
        if not await self._reports_the_capture_of(item, payment_id):
            return AutoFix(fixed=False)
        settled = await self.sweeper.settle_if_captured(payment_id)
        if settled is None:
            return AutoFix(fixed=False)
        return AutoFix(
            fixed=True,
            resolution="posted_capture",
            note=settled,
            evidence_line_id=item.line_id,
        )

    async def _reports_the_capture_of(self, item: cases.DiscrepancyRow, payment_id: str) -> bool:
        """Whether the line is the payment's capture: money in, of exactly the payment's
        amount and currency (a payment's amount is positive, so a refund or a fee, money
        out, never equals it). Only such a line is evidence for posting the capture; a
        refund, a fee or a wrong amount that names the payment is left to an operator."""
        stream = payment_stream(payment_id)
        opening = (await self.store.stream_openings([stream])).get(stream)
        if opening is None:
            return False
        payment = opening.payload
        return (item.statement_amount_minor, item.statement_currency) == (
            payment.get("amount_minor"),
            payment.get("currency"),
        )

    @activity.defn(name="recon.resolve")
    async def resolve(self, record: RecordResolution) -> DiscrepancyOutcome:
        """Append DiscrepancyResolved (once: its id is the discrepancy's) and close the
        discrepancy in `recon.discrepancies`."""
        case = record.case
        stream = recon_stream(case.run_id)
        await self.store.append(
            NewEvent(
                stream_id=stream,
                event=DiscrepancyResolved(
                    run_id=case.run_id,
                    discrepancy_id=case.discrepancy_id,
                    resolution=record.resolution,
                    note=record.note,
                    resolved_by=record.resolved_by,
                    evidence_line_id=record.evidence_line_id,
                ),
                event_id=event_id_for(stream, f"resolved/{case.discrepancy_id}"),
                actor=record.resolved_by,
                correlation_id=_workflow_id(),
            )
        )
        async with self._connect() as conn:
            stored = await cases.mark_resolved(
                conn,
                case.discrepancy_id,
                code=record.resolution,
                note=record.note,
                by=record.resolved_by,
            )
        return DiscrepancyOutcome(
            discrepancy_id=stored.discrepancy_id,
            resolution=cast(Resolution, stored.resolution),
            resolved_by=stored.resolved_by or record.resolved_by,
            automatic=stored.resolved_by == ACTOR,
        )

    def all(self) -> list[object]:
        return [
            self.ingest_inbox,
            self.reconcile,
            self.record,
            self.open_cases,
            self.auto_fix,
            self.resolve,
        ]


def _is_payment_id(value: str | None) -> bool:
    return value is not None and PAYMENT_ID.match(value) is not None


def _read_capped(path: Path) -> bytes:
    """The file's bytes; a file over INBOX_FILE_BYTES_MAX is refused unread, and no more
    than that is ever read, even from a file that grows meanwhile."""
    too_large = StatementError(f"the file is larger than {INBOX_FILE_BYTES_MAX} bytes")
    if path.stat().st_size > INBOX_FILE_BYTES_MAX:
        raise too_large
    with path.open("rb") as file:
        content = file.read(INBOX_FILE_BYTES_MAX + 1)
    if len(content) > INBOX_FILE_BYTES_MAX:
        raise too_large
    return content


def _distinct_suffix(path: Path) -> str:
    """Eight hex digits that tell two files of one name apart: from the content, read in
    chunks, when it is within INBOX_FILE_BYTES_MAX; from its size and time when it was
    refused for its size, so that a huge file is never read."""
    stat = path.stat()
    if stat.st_size > INBOX_FILE_BYTES_MAX:
        return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:8]


def _move(path: Path, folder: Path, *, reason: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    if target.exists():
        target = folder / f"{path.stem}-{_distinct_suffix(path)}{path.suffix}"
    shutil.move(str(path), target)
    if reason is not None:
        target.with_name(target.name + ".error.txt").write_text(reason + "\n", encoding="utf-8")


def _workflow_id() -> str | None:
    return activity.info().workflow_id if activity.in_activity() else None


def _heartbeat(details: str) -> None:
    if activity.in_activity():
        activity.heartbeat(details)


async def seal_checkpoint(conn: psycopg.AsyncConnection[Any]) -> SealPoint | None:
    """The newest block a reconciliation run verified, if any."""
    cursor = await conn.execute(
        "SELECT block_no, last_seq, hash FROM recon.seal_verifications "
        "ORDER BY block_no DESC LIMIT 1"
    )
    row = await cursor.fetchone()
    return None if row is None else SealPoint(int(row[0]), int(row[1]), bytes(row[2]))
