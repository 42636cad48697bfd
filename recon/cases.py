"""Discrepancies as operators and the ledger see them: read with their summary (a
sentence that reads like the problem), internal drift recorded, resolutions stored.

`recon/matching.py` finds and stores statement discrepancies; this module adds the ones
the ledger's internal checks find, and reads and resolves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ledger.events import DiscrepancyType
from ledger.money import format_amount
from workflows.reconciliation_models import DiscrepancyCase

DRIFT = "internal_drift"
# Discrepancies listed per page at most.
LIST_LIMIT_MAX = 500
FINDING_TEXT_CHARS_MAX = 480


@dataclass(frozen=True)
class Finding:
    """A difference the ledger's internal checks found: `check` and `subject` name it,
    so that the same difference is recorded once, however many runs see it."""

    check: str
    subject: str
    description: str
    payment_id: str | None = None

    @property
    def problem_key(self) -> str:
        return f"{DRIFT}:{self.check}:{self.subject}"[:400]


@dataclass(frozen=True)
class DiscrepancyRow:
    discrepancy_id: str
    discrepancy_type: DiscrepancyType
    run_id: str
    status: str
    payment_id: str | None
    reference: str | None
    statement_amount_minor: int | None
    statement_currency: str | None
    ledger_amount_minor: int | None
    ledger_currency: str | None
    line_id: int | None
    ledger_seq: int | None
    value_date: date | None
    detected_at: datetime
    resolution: str | None
    resolution_note: str | None
    resolved_by: str | None
    resolved_at: datetime | None
    details: dict[str, Any]

    @property
    def summary(self) -> str:
        return describe(self)

    def case(self, run_id: str | None = None) -> DiscrepancyCase:
        return DiscrepancyCase(
            discrepancy_id=self.discrepancy_id,
            run_id=run_id or self.run_id,
            discrepancy_type=self.discrepancy_type,
            payment_id=self.payment_id,
            summary=self.summary[:400],
        )


def money(amount_minor: int | None, currency: str | None) -> str:
    if amount_minor is None or currency is None:
        return "nothing"
    try:
        return format_amount(amount_minor, currency)
    except ValueError:
        return f"{amount_minor} minor units of {currency}"


def describe(row: DiscrepancyRow) -> str:
    """The discrepancy in one sentence, as an operator would say it."""
    who = row.payment_id or row.reference or "an unnamed line"
    statement = money(row.statement_amount_minor, row.statement_currency)
    ledger = money(row.ledger_amount_minor, row.ledger_currency)
    match row.discrepancy_type:
        case "missing_in_ledger":
            return f"{statement} for {who} is on the statement but not in the ledger"
        case "missing_in_statement":
            when = f", settled {row.value_date.isoformat()}" if row.value_date else ""
            return f"The ledger settled {ledger} for {who}{when}, but no statement shows it"
        case "amount_mismatch":
            return f"{who}: {statement} on the statement, {ledger} in the ledger"
        case "currency_mismatch":
            return f"{who}: {statement} on the statement, {ledger} in the ledger (currency)"
        case "duplicate_in_statement":
            return f"{statement} for {who} appears on the statement again"
        case _:
            text = row.details.get("description")
            return str(text) if text else f"the ledger disagrees with itself about {who}"


_SELECT = """
SELECT d.discrepancy_id::text AS discrepancy_id, d.type AS discrepancy_type, d.run_id,
       d.status, d.payment_id, d.reference,
       d.amount_minor AS statement_amount_minor, d.currency AS statement_currency,
       d.expected_amount_minor AS ledger_amount_minor,
       d.expected_currency AS ledger_currency,
       d.line_id, i.global_seq AS ledger_seq, coalesce(l.value_date, i.value_date) AS value_date,
       d.detected_at, d.resolution_code AS resolution, d.resolution_note, d.resolved_by,
       d.resolved_at, d.details
  FROM recon.discrepancies d
  LEFT JOIN recon.items i ON i.item_id = d.item_id
  LEFT JOIN recon.statement_lines l ON l.line_id = d.line_id
"""


async def _rows(
    conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
) -> list[DiscrepancyRow]:
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(query, params)
        return [DiscrepancyRow(**row) for row in await cursor.fetchall()]


async def discrepancies(conn: psycopg.AsyncConnection[Any], ids: list[str]) -> list[DiscrepancyRow]:
    """These discrepancies, in a stable order (unknown ids are left out)."""
    if not ids:
        return []
    return await _rows(
        conn,
        _SELECT
        + " WHERE d.discrepancy_id = ANY(%(ids)s::uuid[]) ORDER BY d.type, d.discrepancy_id",
        {"ids": ids},
    )


async def list_discrepancies(
    conn: psycopg.AsyncConnection[Any],
    *,
    status: str | None,
    run_id: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[DiscrepancyRow]:
    """Newest first, optionally of one status or one run; `before` is the last row seen."""
    limit = min(limit, LIST_LIMIT_MAX)
    where = ["(%(status)s::text IS NULL OR d.status = %(status)s)"]
    where.append("(%(run)s::text IS NULL OR d.run_id = %(run)s)")
    if before is not None:
        where.append("(d.detected_at, d.discrepancy_id) < (%(at)s, %(id)s::uuid)")
    query = (
        _SELECT
        + " WHERE "
        + " AND ".join(where)
        + " ORDER BY d.detected_at DESC, d.discrepancy_id DESC LIMIT %(limit)s"
    )
    params = {
        "status": status,
        "run": run_id,
        "at": before[0] if before else None,
        "id": before[1] if before else None,
        "limit": limit,
    }
    return await _rows(conn, query, params)


_DRIFT_INSERT = """
INSERT INTO recon.discrepancies (discrepancy_id, problem_key, type, payment_id, run_id,
                                 detected_at, details)
SELECT md5(inst.ledger_id::text || ':' || f.key)::uuid, f.key, 'internal_drift',
       f.payment_id, %(run)s, %(now)s,
       jsonb_build_object('check', f.check_name, 'description', f.description)
  FROM unnest(%(keys)s::text[], %(payments)s::text[], %(checks)s::text[],
              %(descriptions)s::text[]) AS f(key, payment_id, check_name, description)
 CROSS JOIN recon.installation inst
ON CONFLICT (problem_key) DO NOTHING
"""
_DRIFT_OF_RUN = """
SELECT discrepancy_id::text FROM recon.discrepancies
 WHERE run_id = %(run)s AND type = 'internal_drift' ORDER BY discrepancy_id
"""


async def record_internal_drift(
    conn: psycopg.AsyncConnection[Any], run_id: str, findings: list[Finding], now: datetime
) -> list[str]:
    """Record each finding once (a finding already recorded by any run adds nothing);
    returns the ids of the internal drift this run recorded first."""
    if findings:
        await conn.execute(
            _DRIFT_INSERT,
            {
                "run": run_id,
                "now": now,
                "keys": [f.problem_key for f in findings],
                "payments": [f.payment_id for f in findings],
                "checks": [f.check[:100] for f in findings],
                "descriptions": [f.description[:FINDING_TEXT_CHARS_MAX] for f in findings],
            },
        )
    cursor = await conn.execute(_DRIFT_OF_RUN, {"run": run_id})
    return [str(row[0]) for row in await cursor.fetchall()]


_RESOLVE = """
UPDATE recon.discrepancies
   SET status = 'resolved', resolution_code = %(code)s, resolution_note = %(note)s,
       resolved_by = %(by)s, resolved_at = clock_timestamp()
 WHERE discrepancy_id = %(id)s::uuid AND status = 'open'
"""


async def mark_resolved(
    conn: psycopg.AsyncConnection[Any], discrepancy_id: str, *, code: str, note: str, by: str
) -> DiscrepancyRow:
    """Close the discrepancy (a second call changes nothing); the row as stored."""
    await conn.execute(_RESOLVE, {"id": discrepancy_id, "code": code, "note": note, "by": by})
    rows = await discrepancies(conn, [discrepancy_id])
    if not rows:
        raise LookupError(f"no discrepancy {discrepancy_id}")
    return rows[0]


_OPEN_BY_TYPE = """
SELECT type, count(*) AS open,
       count(*) FILTER (WHERE detected_at < clock_timestamp() - make_interval(secs => %(age)s))
  FROM recon.discrepancies WHERE status = 'open' GROUP BY type
"""


async def open_counts(
    conn: psycopg.AsyncConnection[Any], *, overdue_after_s: int
) -> dict[str, tuple[int, int]]:
    """Per type: how many discrepancies are open, and how many of those are overdue."""
    cursor = await conn.execute(_OPEN_BY_TYPE, {"age": overdue_after_s})
    return {str(r[0]): (int(r[1]), int(r[2])) for r in await cursor.fetchall()}


@dataclass(frozen=True)
class RunRow:
    run_id: str
    kind: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    counts: dict[str, Any]


async def run(conn: psycopg.AsyncConnection[Any], run_id: str) -> RunRow | None:
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(
            "SELECT run_id, kind, status, started_at, finished_at, coalesce(counts, '{}') AS counts"
            " FROM recon.runs WHERE run_id = %(run)s",
            {"run": run_id},
        )
        row = await cursor.fetchone()
    return None if row is None else RunRow(**row)


_DAILY = """
SELECT l.value_date AS day, 'matched' AS series, count(*) AS n
  FROM recon.matched_lines ml
  JOIN recon.statement_lines l ON l.line_id = ml.line_id
 WHERE ml.run_id = %(run)s
 GROUP BY l.value_date
UNION ALL
SELECT coalesce(l.value_date, i.value_date, d.detected_at::date), d.type, count(*)
  FROM recon.discrepancies d
  LEFT JOIN recon.statement_lines l ON l.line_id = d.line_id
  LEFT JOIN recon.items i ON i.item_id = d.item_id
 WHERE d.run_id = %(run)s
 GROUP BY 1, 2
"""


async def daily_counts(
    conn: psycopg.AsyncConnection[Any], run_id: str
) -> list[tuple[date, str, int]]:
    """Per value date: the lines this run matched, and each type of discrepancy it found."""
    cursor = await conn.execute(_DAILY, {"run": run_id})
    return [(row[0], str(row[1]), int(row[2])) for row in await cursor.fetchall()]


# Runs listed per page at most.
RUNS_LIMIT_MAX = 200


async def list_runs(
    conn: psycopg.AsyncConnection[Any], *, before: tuple[datetime, str] | None, limit: int
) -> list[RunRow]:
    """Runs, newest first; `before` is the (started_at, run_id) of the last row seen."""
    limit = min(limit, RUNS_LIMIT_MAX)
    where = "WHERE (started_at, run_id) < (%(at)s, %(id)s)" if before is not None else ""
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(
            "SELECT run_id, kind, status, started_at, finished_at, coalesce(counts, '{}') AS counts"
            f" FROM recon.runs {where} ORDER BY started_at DESC, run_id DESC LIMIT %(limit)s",
            {
                "at": before[0] if before else None,
                "id": before[1] if before else None,
                "limit": limit,
            },
        )
        return [RunRow(**row) for row in await cursor.fetchall()]


@dataclass(frozen=True)
class SealVerification:
    """How far reconciliation last verified the seal, and when."""

    run_id: str
    block_no: int
    last_seq: int
    full_run: bool
    verified_at: datetime


async def latest_seal_verification(conn: psycopg.AsyncConnection[Any]) -> SealVerification | None:
    """The newest verification of the seal that a reconciliation run recorded."""
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(
            "SELECT run_id, block_no, last_seq, full_run, verified_at "
            "FROM recon.seal_verifications ORDER BY block_no DESC, verified_at DESC LIMIT 1"
        )
        row = await cursor.fetchone()
    return None if row is None else SealVerification(**row)
